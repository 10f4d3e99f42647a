"""A site's round without Flower (braintumnet.site_round), on the tiny synthetic cohort, on the CPU."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import replace

import pytest
import torch

import braintumnet.site_round
from braintumnet.config import DataConfig, resolve
from braintumnet.data.loading import SiteRuntime
from braintumnet.engine import build_model
from braintumnet.privacy import PrivacyLedger, epsilon
from braintumnet.protocol import (DP_BUDGET_SPENT, DP_EPSILON, EVAL_KEYS, EVALUATE_SECONDS, RECEIVED_KEYS,
                                  RECEIVED_PREFIX, REPLY_METRIC_KEYS, SECONDS, TRAIN_KEYS, WEIGHT_KEY)
from braintumnet.site_policy import SIMULATION_POLICY, PolicyRefusal, SitePolicy
from braintumnet.site_round import evaluate_round, train_round

DP = {"dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.delta": 1e-5}


def cache_of(name, cache_root, folder):
    """A cache root of its own holding only the session's prepared slices of ``name``: what a wiped cache rebuilds."""
    folder.mkdir(parents=True)
    (folder / name).symlink_to(cache_root / name, target_is_directory=True)
    return folder


@pytest.fixture
def site(prepared_sites, phantom_root, cache_root, tmp_path):
    """plagh on the session's prepared cache, with a cache root and a state directory of its own."""
    return SiteRuntime("plagh", phantom_root / "plagh", cache_of("plagh", cache_root, tmp_path / "cache")), \
        tmp_path / "state"


def one_epoch(run_config, **overrides):
    return resolve({**run_config, "train.local-epochs": 1, **overrides})


def policy_for(profile, **rules):
    """A hospital's policy allowing the tiny profile's data settings, with ``rules`` changed."""
    return replace(SitePolicy(allowed_data=(profile.data,)), **rules)


def test_a_round_scores_the_received_model_first_and_sends_only_protocol_keys(site, tiny_run_config,
                                                                               prepared_sites):
    runtime, state_dir = site
    profile = one_epoch(tiny_run_config)
    received = build_model(profile).state_dict()
    kw = {"policy": SIMULATION_POLICY, "state_dir": state_dir}
    state, metrics = train_round(received, profile, runtime, server_round=1, total_rounds=1,
                                 federation_id="federation-1", evaluate_received=True, **kw)
    assert set(metrics) <= REPLY_METRIC_KEYS and set(RECEIVED_KEYS) <= set(metrics)
    assert 0 < metrics[EVALUATE_SECONDS] < metrics[SECONDS]  # the scoring's share of the round, for the centre's polls
    assert metrics[WEIGHT_KEY] == (prepared_sites["plagh"].slices["split"] == "train").sum()
    assert all(math.isfinite(metrics[k]) for k in TRAIN_KEYS)
    assert list(state) == list(received) and any(not torch.equal(state[k], received[k]) for k in state)
    scored = evaluate_round(received, profile, runtime, server_round=0, federation_id="federation-1", **kw)
    scored.pop(SECONDS)
    assert {k: metrics[RECEIVED_PREFIX + k] for k in scored} == pytest.approx(scored, nan_ok=True)


def test_a_site_trains_in_batches_of_the_site_batch_size_not_the_pooled_one(site, tiny_run_config, monkeypatch):
    """Three sites' batches of train.site-batch-size make one pooled batch (docs/federation.md); a site must not fall
    back to train.batch-size, the centralized arm's."""
    runtime, state_dir = site
    profile = one_epoch(tiny_run_config, **{"train.batch-size": 8, "train.site-batch-size": 3})
    batches = []
    real = braintumnet.site_round.train_model

    def recording(model, sites, trained_profile, *args, **kwargs):
        batches.append(trained_profile.train.batch_size)
        return real(model, sites, trained_profile, *args, **kwargs)

    monkeypatch.setattr(braintumnet.site_round, "train_model", recording)
    train_round(build_model(profile).state_dict(), profile, runtime, server_round=1, total_rounds=1,
                federation_id="federation-1", policy=SIMULATION_POLICY, state_dir=state_dir)
    assert batches == [3]


def test_under_dp_the_losses_stay_at_the_site_and_a_spent_budget_trains_nothing(site, tiny_run_config):
    runtime, state_dir = site
    profile = one_epoch(tiny_run_config, **DP, **{"dp.max-epsilon": 1000.0})
    kw = {"policy": SIMULATION_POLICY, "state_dir": state_dir, "federation_id": "federation-1"}
    received = build_model(profile).state_dict()
    state, metrics = train_round(received, profile, runtime, server_round=1, total_rounds=2, **kw)
    assert state is not None and metrics[DP_BUDGET_SPENT] == 0 and metrics[DP_EPSILON] > 0
    assert all(math.isnan(metrics[k]) for k in TRAIN_KEYS)

    capped = one_epoch(tiny_run_config, **DP, **{"dp.max-epsilon": metrics[DP_EPSILON] * 1.01})
    state, refused = train_round(received, capped, runtime, server_round=2, total_rounds=2, **kw)
    assert state is None and refused[DP_BUDGET_SPENT] == 1 and refused[WEIGHT_KEY] == 0
    assert refused[DP_EPSILON] == pytest.approx(metrics[DP_EPSILON])  # read back from the site's ledger
    assert set(refused) <= REPLY_METRIC_KEYS and all(math.isnan(refused[k]) for k in TRAIN_KEYS)
    lines = (state_dir / "plagh" / "privacy-ledger.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"federation_id": "federation-1"' in lines[0]  # in the state dir, not the cache
    assert not (runtime.cache / "privacy").exists()


def test_epsilon_survives_a_new_federation_and_a_wiped_cache(site, tiny_run_config, cache_root, tmp_path, caplog,
                                                             monkeypatch):
    """The site's lifetime cap counts every federation: neither a new federation id (a fresh ``flwr run``) nor a
    cache rebuilt from scratch starts its ε at 0 again."""
    monkeypatch.setattr(logging.getLogger("braintumnet"), "propagate", True)  # a ClientApp in-process may stop it
    runtime, state_dir = site
    profile = one_epoch(tiny_run_config, **DP)
    received = build_model(profile).state_dict()
    _, first = train_round(received, profile, runtime, server_round=1, total_rounds=1, federation_id="fed-A",
                           policy=policy_for(profile), state_dir=state_dir)
    assert first[DP_BUDGET_SPENT] == 0
    with PrivacyLedger(state_dir, "plagh").locked() as ledger:
        (sigma, q, steps), = ledger.history()
    cap = (first[DP_EPSILON] + epsilon([(sigma, q, 2 * steps)], 1e-5)) / 2  # room for one round, not for two
    shutil.rmtree(runtime.cache)  # the cache wiped and rebuilt: nothing but the prepared slices
    wiped = replace(runtime, cache=cache_of("plagh", cache_root, tmp_path / "cache"))
    lifetime = policy_for(profile, max_epsilon_lifetime=cap)
    with caplog.at_level(logging.WARNING, logger="braintumnet.client"):
        state, refused = train_round(received, profile, wiped, server_round=1, total_rounds=1,
                                     federation_id="fed-B", policy=lifetime, state_dir=state_dir)
    assert state is None and refused[DP_BUDGET_SPENT] == 1 and refused[DP_EPSILON] == 0  # fed-B spent nothing
    assert "site policy max-epsilon-lifetime" in caplog.text and "no longer trains in any federation" in caplog.text
    # the per-federation cap counts the federation's own rounds only
    per_federation = policy_for(profile, max_epsilon_per_federation=cap)
    _, again = train_round(received, profile, wiped, server_round=1, total_rounds=1, federation_id="fed-B",
                           policy=per_federation, state_dir=state_dir)
    assert again[DP_BUDGET_SPENT] == 0 and again[DP_EPSILON] == pytest.approx(first[DP_EPSILON])
    with PrivacyLedger(state_dir, "plagh").locked() as ledger:
        assert [e["federation_id"] for e in ledger.entries] == ["fed-A", "fed-B"]
        assert ledger.epsilon(None, 1e-5) > ledger.epsilon("fed-B", 1e-5)  # lifetime = both federations


@pytest.mark.parametrize("change, rule", [
    ({"dp.enabled": False}, "dp-required"),
    ({"dp.noise-multiplier": 0.3}, "min-noise-multiplier"),
    ({"dp.delta": 1e-3}, "delta"),
    ({"data.img-size": 48}, "allowed-data"),
])
def test_a_run_the_policy_forbids_is_refused_before_the_data_are_opened(change, rule, tiny_run_config, tmp_path):
    """No data folder and an empty cache: a check made after opening the site would fail on the data instead."""
    nowhere = SiteRuntime("plagh", None, tmp_path / "empty-cache")
    profile = one_epoch(tiny_run_config, **DP)
    with pytest.raises(PolicyRefusal, match=f"^refused by the site's policy, rule {rule}$") as err:
        train_round({}, one_epoch(tiny_run_config, **{**DP, **change}), nowhere, server_round=1, total_rounds=1,
                    federation_id="f", policy=policy_for(profile), state_dir=tmp_path / "state")
    assert err.value.rule == rule and not (tmp_path / "state").exists() and not (tmp_path / "empty-cache").exists()


def test_a_derived_noise_below_the_floor_is_refused_before_any_step(site, tiny_run_config):
    runtime, state_dir = site
    greedy = one_epoch(tiny_run_config, **{**DP, "dp.noise-multiplier": 0.0, "dp.target-epsilon": 500.0})
    received = build_model(greedy).state_dict()
    with pytest.raises(PolicyRefusal) as err:
        train_round(received, greedy, runtime, server_round=1, total_rounds=1, federation_id="f",
                    policy=policy_for(greedy), state_dir=state_dir)
    assert err.value.rule == "min-noise-multiplier" and "below the site's minimum 0.8" in err.value.detail
    with PrivacyLedger(state_dir, "plagh").locked() as ledger:
        assert ledger.entries == []  # nothing trained, nothing spent


def test_evaluations_are_capped_per_federation_refused_before_evaluating_and_rounded(site, tiny_run_config,
                                                                                    monkeypatch):
    runtime, state_dir = site
    profile = one_epoch(tiny_run_config)
    model = build_model(profile).state_dict()
    policy = policy_for(profile, max_evaluations_per_federation=1, min_test_cases=1, metric_decimals=2)
    kw = {"policy": policy, "state_dir": state_dir, "server_round": 1}
    raw = evaluate_round(model, profile, runtime, federation_id="fed-0",
                         **{**kw, "policy": replace(policy, metric_decimals=-1)})
    scored = evaluate_round(model, profile, runtime, federation_id="fed-1", **kw)
    assert {k: scored[k] for k in EVAL_KEYS} == pytest.approx({k: round(raw[k], 2) for k in EVAL_KEYS}, abs=0,
                                                              nan_ok=True)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the policy refuses it")

    monkeypatch.setattr(braintumnet.site_round, "evaluate_model", no_evaluation)
    with pytest.raises(PolicyRefusal, match="rule max-evaluations-per-federation$"):
        evaluate_round(model, profile, runtime, federation_id="fed-1", **kw)
    with pytest.raises(PolicyRefusal, match="rule max-evaluations-per-federation$"):  # evaluate-in-train counts too
        train_round(model, profile, runtime, total_rounds=2, federation_id="fed-1", evaluate_received=True,
                    **{**kw, "policy": replace(policy, dp_required=False)})
    with pytest.raises(PolicyRefusal, match="rule min-test-cases$"):
        evaluate_round(model, profile, runtime, federation_id="fed-2", **{**kw, "policy": policy_for(
            profile, min_test_cases=10_000)})
    with pytest.raises(PolicyRefusal, match="rule allowed-data$"):
        evaluate_round(model, replace(profile, data=DataConfig(img_size=48)), runtime, federation_id="fed-3", **kw)
