"""The site's own policy (braintumnet.site_policy, client/sites.py) and its ledger (braintumnet.privacy.PrivacyLedger):
typed from the site config, unknown keys refused; the ledger is append-only, locked, and never silently empty."""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import time

import pytest

from braintumnet.config import DataConfig, PrivacyConfig, resolve
from braintumnet.errors import BrainTumNetError
from braintumnet.privacy import PrivacyLedger, PrivateTraining, epsilon, group_privacy
from braintumnet.site_policy import POLICY_KEYS, SitePolicy
from client.sites import REPO, SiteSettings, site_policy, site_settings, state_summary

ROUND = (1.0, 0.1, 10)  # σ, q, steps of one made-up round


def spend(ledger: PrivacyLedger, federation: str, pause: float = 0.0) -> dict:
    """A round as train_round spends it, without the training: read, (train,) append, all under the lock."""
    with ledger.locked():
        before = ledger.history(federation)
        seen = len(ledger.entries)
        time.sleep(pause)  # the training: the window in which an unlocked second run reads the same ε
        dp = PrivateTraining(PrivacyConfig(enabled=True, noise_multiplier=ROUND[0]), before + [ROUND])
        dp.noise_multiplier, dp.sample_rate = ROUND[0], ROUND[1]
        return ledger.record(dp, federation_id=federation, run_id="r", server_round=seen, before=before)


def _worker(state_dir, rounds):
    ledger = PrivacyLedger(state_dir, "yibin")
    for _ in range(rounds):
        spend(ledger, "fed", pause=0.005)


def test_two_processes_spending_at_once_lose_no_round(tmp_path):
    epsilon([ROUND], 1e-5)  # import Opacus once, before forking
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(tmp_path, 10)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    with PrivacyLedger(tmp_path, "yibin").locked() as ledger:
        entries = ledger.entries
    assert len(entries) == 20
    assert sorted(e["round"] for e in entries) == list(range(20))  # each read saw every line before it
    assert entries[-1]["epsilon_federation"] == pytest.approx(epsilon([(1.0, 0.1, 200)], 1e-5))


def test_a_lost_ledger_is_an_error_until_an_admin_resets_it(tmp_path):
    state, cache = tmp_path / "state", tmp_path / "cache"
    spend(PrivacyLedger(state, "yibin", cache), "fed")
    settings = SiteSettings(name="yibin", data=tmp_path / "data", cache=cache, state_dir=state)
    assert "1 trained rounds in the privacy ledger, 0 evaluations" in state_summary(settings)[-1]  # the preflight
    (state / "yibin" / "privacy-ledger.jsonl").unlink()
    with pytest.raises(BrainTumNetError, match="journal is missing, but .*privacy-ledger.started"):
        spend(PrivacyLedger(state, "yibin", cache), "fed")
    with pytest.raises(BrainTumNetError, match="journal is missing"):
        state_summary(settings)  # found before the SuperNode starts
    shutil.rmtree(state)  # the whole state directory (a container without a volume for it)
    with pytest.raises(BrainTumNetError, match=r"journal is missing, but .*\.site-state/yibin/privacy-ledger.witness"):
        spend(PrivacyLedger(state, "yibin", cache), "fed")
    (cache / ".site-state" / "yibin" / "privacy-ledger.witness.json").unlink()  # the documented, knowing reset
    assert spend(PrivacyLedger(state, "yibin", cache), "fed")["epsilon_federation"] == pytest.approx(
        epsilon([ROUND], 1e-5))


def test_two_state_folders_sharing_one_cache_each_keep_their_own_witness(tmp_path):
    """A simulated site and a deployed one may share a cache: the witness vouches for each journal it saw, so a new
    state folder starts empty, and a lost journal of either is still found."""
    cache, first, second = tmp_path / "cache", tmp_path / "state-a", tmp_path / "state-b"
    spend(PrivacyLedger(first, "yibin", cache), "fed")
    spend(PrivacyLedger(second, "yibin", cache), "fed")  # not "missing": this journal never existed before
    shutil.rmtree(first)
    with pytest.raises(BrainTumNetError, match=r"journal is missing, but .*privacy-ledger.witness"):
        spend(PrivacyLedger(first, "yibin", cache), "fed")
    assert spend(PrivacyLedger(second, "yibin", cache), "fed")["epsilon_federation"] == pytest.approx(
        epsilon([ROUND, ROUND], 1e-5))  # its own two rounds


def test_the_previous_per_federation_ledger_is_taken_over(tmp_path):
    old = tmp_path / "cache" / "privacy" / "yibin"
    old.mkdir(parents=True)
    (old / "fed-old.json").write_text(json.dumps({"accountant": "rdp", "delta": 1e-5, "history": [list(ROUND)],
                                                  "rounds": [{"round": 1, "epsilon": 1.0}]}))
    ledger = PrivacyLedger(tmp_path / "state", "yibin", tmp_path / "cache")
    spend(ledger, "fed-new")
    with ledger.locked():
        assert ledger.history("fed-old") == [ROUND] and len(ledger.history()) == 2


def test_group_privacy_per_patient():
    assert group_privacy(1.0, 1e-5, 20) == pytest.approx((20.0, 20 * math.exp(19) * 1e-5))
    assert group_privacy(0.5, 1e-6, 1) == pytest.approx((0.5, 1e-6))
    assert group_privacy(100.0, 1e-5, 20)[1] == math.inf


def write(path, text):
    path.write_text(text)
    return path


def test_the_policy_is_typed_from_the_site_config_and_unknown_keys_are_refused(tmp_path):
    cfg = write(tmp_path / "sites.toml", """
[defaults]
state-dir = "state"
[defaults.run-config]
profile = "quick"
[defaults.policy]
max-epsilon-lifetime = 12.0
[site.yibin]
data = "d"
[site.yibin.policy]
min-noise-multiplier = 1
allowed-data = [{ img-size = 64, slices-per-case = 8 }, { img-size = 128 }]
[site.plagh]
data = "d"
""")
    policy, state_dir = site_policy(cfg, "yibin")
    assert state_dir == tmp_path / "state"
    assert (policy.max_epsilon_lifetime, policy.min_noise_multiplier, policy.dp_required) == (12.0, 1, True)
    assert policy.allowed_data == (DataConfig(img_size=64, slices_per_case=8), DataConfig(img_size=128))
    # plagh: the defaults, and only the data settings its run-config prepares
    assert site_policy(cfg, "plagh")[0] == SitePolicy(max_epsilon_lifetime=12.0, allowed_data=(resolve({}).data,))
    assert site_settings(cfg, "yibin").policy == policy

    bad = write(tmp_path / "bad.toml", '[site.yibin]\ndata = "d"\n[site.yibin.policy]\nmax-epsilon = 3.0\n')
    with pytest.raises(BrainTumNetError, match=r"unknown policy key\(s\) \['max-epsilon'\]; known keys: ") as err:
        site_policy(bad, "yibin")
    assert all(key in str(err.value) for key in POLICY_KEYS)
    with pytest.raises(BrainTumNetError, match=r"unknown policy key"):
        site_settings(bad, "yibin")  # the launcher refuses to start with it
    for text, match in [("dp-required = 1", r"dp-required = 1: expected bool"),
                        ("max-evaluations-per-federation = 2.5", "expected int"),
                        ("delta = 2.0", r"delta=2.0: use a value in \(0, 1\)"),
                        ("allowed-data = [{ img-size = 64, slices = 8 }]", r"unknown key\(s\) \['slices'\]")]:
        with pytest.raises(BrainTumNetError, match=match):
            site_policy(write(tmp_path / "t.toml", f'[defaults.policy]\n{text}\n'), "yibin")


def test_the_shipped_site_configs_write_out_a_hospitals_policy():
    """The deployment kit's site config holds the code's defaults (a hospital's); the phantom demo differs only in
    letting its synthetic hospitals train without DP."""
    policy, state_dir = site_policy(REPO / "deploy" / "site" / "sites.toml", "yibin")
    assert policy == SitePolicy(allowed_data=(resolve({"profile": "paper"}).data,)) and state_dir.as_posix() == "/state"
    demo, _ = site_policy(REPO / "client" / "sites.toml", "yibin")
    assert demo == SitePolicy(dp_required=False, allowed_data=(resolve({"profile": "quick"}).data,))
