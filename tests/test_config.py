"""The run config in pyproject.toml and the typed dataclasses agree; profiles, overrides and the app's keys
resolve; switches and ``key=value`` overrides have one reading."""

import tomllib
from pathlib import Path

import pytest

from braintumnet.config import (PROFILES, AppConfig, ConfigError, app_config, at_site, defaults, from_dict, parse_bool,
                                parse_overrides, resolve, site_batch, to_dict)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_the_typed_defaults():
    """Nothing reads pyproject.toml at run time: the dataclasses' defaults are the run config's, key by key and
    type by type (a profile key whose value differs between profiles is 0, "the profile's")."""
    typed, written = defaults(), run_config()
    assert set(typed) == set(written), f"keys only typed: {sorted(set(typed) - set(written))}, only in pyproject: " \
                                       f"{sorted(set(written) - set(typed))}"
    differ = {k: (written[k], typed[k]) for k in typed if (written[k], type(written[k])) != (typed[k], type(typed[k]))}
    assert not differ, f"pyproject.toml value, typed default: {differ}"


def test_pyproject_defaults_resolve_to_the_quick_profile():
    assert resolve(run_config()) == PROFILES["quick"]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_by_name(name):
    assert resolve({"profile": name}) == PROFILES[name]


def test_override_beats_profile_and_zero_means_profile():
    p = resolve({"profile": "paper", "data.img-size": 64, "model.feature-size": 0, "train.learning-rate": 3e-4})
    assert p.data.img_size == 64
    assert p.model.feature_size == PROFILES["paper"].model.feature_size
    assert p.train.learning_rate == pytest.approx(3e-4)


def test_gate_gradient_switch_reaches_the_model():
    from braintumnet.engine import build_model
    from braintumnet.model.braintumnet import Detach

    assert resolve({}).model.gate_gradient is False  # detached by default (docs/model-card.md)
    profile = resolve({"model.gate-gradient": "true"})
    assert profile.model.gate_gradient is True
    assert not isinstance(build_model(profile).gate_grad, Detach)
    assert isinstance(build_model(resolve({})).gate_grad, Detach)


def test_paper_profile_is_the_papers_settings():
    p = PROFILES["paper"]
    assert (p.data.img_size, p.data.slices_per_case) == (256, 20)
    assert (p.train.epochs, p.train.batch_size, p.train.learning_rate) == (250, 16, 1e-4)
    assert (p.train.weight_seg, p.train.weight_cls) == (1.0, 0.7)


@pytest.mark.parametrize("bad", [{"profile": "huge"}, {"data.img-size": 50}, {"task": "4class"},
                                 {"model.gate-region": "skull"}, {"model.mode": "three-stage"},
                                 {"model.postprocess": "biggest"}])
def test_bad_values_name_themselves(bad):
    with pytest.raises(ValueError) as err:
        resolve(bad)
    assert str(next(iter(bad.values()))) in str(err.value)


def test_round_trip_through_flat_dict():
    p = PROFILES["standard"]
    assert from_dict(to_dict(p)) == p


def test_privacy_and_robust_keys_are_literal_and_checked():
    p = resolve({"robust.norm-factor": 0.0, "dp.enabled": True, "dp.target-epsilon": 8.0, "dp.noise-multiplier": 0.0,
                 "strategy.aggregation": "median"})
    assert p.robust.norm_factor == 0.0  # 0 turns the norm bound off; it does not mean "the profile's"
    assert p.privacy.enabled and p.privacy.budget == 8.0  # max-epsilon 0 = the target
    assert resolve({"dp.enabled": True, "dp.noise-multiplier": 1.0}).privacy.budget == float("inf")
    with pytest.raises(ConfigError, match="strategy.aggregation='krum'"):
        resolve({"strategy.aggregation": "krum"})
    with pytest.raises(ConfigError, match="robust.norm-factor=0.5"):
        resolve({"robust.norm-factor": 0.5})


def test_a_checkpoint_from_before_the_privacy_settings_still_loads():
    flat = {k: v for k, v in to_dict(PROFILES["quick"]).items() if not k.startswith(("privacy.", "robust."))}
    assert from_dict(flat) == PROFILES["quick"]


def test_a_site_trains_in_its_profiles_batch_unless_told_and_an_older_checkpoint_says_the_pooled_one():
    # quick and standard: each site in batches of 3 (about the pooled 8 over three sites); paper: the pooled batch.
    assert site_batch(PROFILES["quick"].train) == at_site(resolve({})).train.batch_size == 3
    assert resolve({}).train.batch_size == 8  # pooled training keeps its batch
    assert at_site(resolve({"train.site-batch-size": 8})).train.batch_size == 8
    standard = resolve({"profile": "standard"})
    assert at_site(standard).train.batch_size == 3 and standard.train.batch_size == 8
    paper = resolve({"profile": "paper"})
    assert at_site(paper).train.batch_size == paper.train.batch_size == 16
    # A checkpoint from before the key trained its sites in the pooled batch, and says so.
    flat = {k: v for k, v in to_dict(PROFILES["quick"]).items() if k != "train.site_batch_size"}
    assert site_batch(from_dict(flat).train) == 8
    with pytest.raises(ConfigError, match="train.site-batch-size=-1"):
        resolve({"train.site-batch-size": -1})


def test_the_committed_simulation_connection_runs_one_supernode_per_default_site():
    """`flwr run . local` (deploy/flwr-home/config.toml) maps partition i to site i of `sites`: as many SuperNodes
    as sites, or a site would never train (the study passes the count explicitly; a bare `flwr run` relies on this)."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    local = tomllib.loads((repo / "deploy" / "flwr-home" / "config.toml").read_text())["superlink"]["local"]
    sites = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]["sites"]
    assert local["address"] == ":local:"
    assert local["options"]["num-supernodes"] == len(sites.split(","))


def test_every_pyproject_key_is_known_and_every_known_key_is_in_pyproject():
    from braintumnet.config import known_keys

    assert set(run_config()) == set(known_keys())


def test_a_misspelt_key_is_refused_with_the_key_it_probably_meant_and_the_known_keys():
    with pytest.raises(ConfigError, match="'model.gate-gradiant'.*did you mean 'model.gate-gradient'") as err:
        resolve({"model.gate-gradiant": False})
    assert "num-server-rounds" in str(err.value) and "phantom-seed" in str(err.value)


def test_the_app_keys_are_typed_with_their_defaults():
    assert app_config({}) == AppConfig() == app_config(run_config())
    app = app_config({"sites": " a, b ,", "audit-messages": "TRUE", "phantom-scale": 1, "checkpoint-dir": ""})
    assert app.sites == ("a", "b") and app.audit_messages is True and app.phantom_scale == 1.0
    assert app.checkpoint_root == Path("runs").absolute()
    with pytest.raises(ConfigError, match="evaluate-in-train='yes': expected true or false"):
        app_config({"evaluate-in-train": "yes"})
    with pytest.raises(ConfigError, match="phantom-seed='x'"):
        app_config({"phantom-seed": "x"})


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), (" False ", False),
                                             ("1", True), (0, False), (1, True)])
def test_one_reading_of_a_switch(value, expected):
    assert parse_bool(value, "k") is expected


@pytest.mark.parametrize("value", ["yes", "", "2", 1.5, None])
def test_a_switch_that_is_neither_is_refused(value):
    with pytest.raises(ConfigError, match="k=.*expected true or false"):
        parse_bool(value, "k")


def test_overrides_read_as_flwr_run_c_with_bare_words_as_text():
    assert parse_overrides(["num-server-rounds=5 model.mode=two-stage", 'resume-from="my runs" dp.enabled=true',
                            "train.learning-rate=3e-4", "num-server-rounds=7"]) == {
        "num-server-rounds": 7, "model.mode": "two-stage", "resume-from": "my runs", "dp.enabled": True,
        "train.learning-rate": 3e-4}
    for bad in ("num-server-rounds", "a=1 stray", ""):
        with pytest.raises(ConfigError, match="key=value"):
            parse_overrides([bad])
