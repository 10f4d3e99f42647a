"""The centre's server optimizers (strategy.server-optimizer): Flower's FedAvgM / FedAdam / FedYogi / FedAdagrad
composed on SiteAwareFedAvg, over the scripted Grid of test_strategy.py: the step, screening under it, dtypes, the
state through a checkpoint and a resume, the config keys, and the Flower internals they rely on."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

import server.optimizers as optimizers_module
from braintumnet.checkpoint import load_checkpoint
from braintumnet.config import PROFILES, ConfigError, ServerOptimizerConfig, from_dict, resolve, to_dict
from braintumnet.errors import BrainTumNetError
from server.app import _check_compatible
from server.checkpoints import RunFolder, find_resume_point, load_server_optimizer, server_optimizer_path
from server.optimizers import FLOWER_CHECKED, FLOWER_INTERNALS, FLOWER_STATE, SiteAwareFedAdam, make_strategy
from server.settings import FederationError, ServerSettings, server_optimizer_params
from server.strategy import SiteAwareFedAvg
from server.tracking import Tracker
from test_strategy import INITIAL, ScriptedGrid, run, site

# Flower's Message constructor reads the process's task identity: the shared fixture in tests/conftest.py sets one.
pytestmark = pytest.mark.usefixtures("task_identity")

OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


@pytest.fixture()
def build(tmp_path):
    def make(optimizer="none", rounds=2, run_config=None, root=None, run_id=7, round_offset=0, **federation):
        base = resolve({"profile": "quick", "data.img-size": 32, "model.feature-size": 8,
                        "strategy.server-optimizer": optimizer, **(run_config or {})})
        profile = replace(base, federation=replace(base.federation, num_rounds=rounds, min_available_nodes=1,
                                                   min_train_nodes=1, min_evaluate_nodes=1, **federation))
        root = root or tmp_path
        return make_strategy(profile, ServerSettings(checkpoint_dir=root, sites=("yibin", "plagh", "jinling")),
                             folder=RunFolder(root, run_id), tracker=Tracker(root, "", "t", "f", {}, {}, enabled=False),
                             class_names=("glioma", "metastasis", "meningioma"), round_offset=round_offset,
                             meta={"federation-id": "f"})
    return make


def two_sites():
    return ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 30, 2.0)})  # FedAvg step: +1.75 a round


def test_the_factory_composes_flowers_class_above_ours():
    mro = [c.__name__ for c in SiteAwareFedAdam.__mro__]
    assert mro[:7] == ["SiteAwareFedAdam", "_ServerOptimizer", "FedAdam", "FedOpt", "_UnderServerOptimizer",
                       "SiteAwareFedAvg", "FedAvg"]


def test_fedavgm_with_momentum_0_and_lr_1_is_fedavg(build):
    plain = run(build("none"), two_sites(), rounds=2)
    fedavgm = build("fedavgm", run_config={"strategy.server-momentum": 0.0, "strategy.server-learning-rate": 1.0})
    same = run(fedavgm, two_sites(), rounds=2)
    for key in INITIAL:
        np.testing.assert_array_equal(same.arrays[key].numpy(), plain.arrays[key].numpy())
    np.testing.assert_allclose(same.arrays["w"].numpy(), 3.5)


def test_fedavgm_momentum_follows_flowers_maths_and_leaves_integer_buffers_alone(build):
    strategy = build("fedavgm", run_config={"strategy.server-momentum": 0.5, "strategy.server-learning-rate": 1.0})
    result = run(strategy, two_sites(), rounds=2)
    # round 1: pseudo-gradient -1.75 starts the momentum, w = 1.75; round 2: momentum 0.5 * -1.75 - 1.75 = -2.625
    np.testing.assert_allclose(result.arrays["w"].numpy(), 1.75 + 2.625)
    np.testing.assert_allclose(strategy.momentum_vector[0], -2.625)
    # the counter is FedAvg's (rint(0 + 1.75) = 2, then rint(2 + 1.75) = 4), never momentum-stepped, still int64
    assert result.arrays["n"].numpy().dtype == np.int64 and int(result.arrays["n"].numpy()) == 4
    assert result.arrays["w"].numpy().dtype == np.float32


def adam_step(delta, eta, t=1, beta_1=0.9, beta_2=0.99, tau=1e-3):  # Flower's FedAdam, first step (m, v from 0)
    m, v = (1 - beta_1) * delta, (1 - beta_2) * delta ** 2
    return eta * math.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1)) * m / (math.sqrt(v) + tau)


FIRST_STEP = {  # Flower's maths for one step from zero moments on the update delta, server learning rate eta
    "fedadam": adam_step,
    "fedyogi": lambda d, eta: eta * 0.1 * d / (math.sqrt(0.01 * d ** 2) + 1e-3),  # v = 0 - 0.01 d^2 sign(0 - d^2)
    "fedadagrad": lambda d, eta: eta * d / (abs(d) + 1e-3),  # no momentum: m = d; v = d^2
}


@pytest.mark.parametrize("optimizer", sorted(FIRST_STEP))
def test_adaptive_first_step_is_flowers_on_the_robust_aggregate(build, optimizer):
    strategy = build(optimizer, rounds=1, run_config={"strategy.aggregation": "median", "robust.norm-factor": 0.0,
                                                      "strategy.server-learning-rate": 0.05})
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0), 13: site("jinling", 40, 9.0)})
    result = run(strategy, grid)
    # the median update is +2 (the weighted mean would be +6.5): the server step moves from the robust aggregate
    expected = FIRST_STEP[optimizer](2.0, 0.05)
    assert 0 < expected < 2.0
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-5)
    assert result.arrays["w"].numpy().dtype == np.float32
    assert result.arrays["n"].numpy().dtype == np.int64 and int(result.arrays["n"].numpy()) == 2  # the median's
    np.testing.assert_allclose(strategy.m_t["w"], 2.0 if optimizer == "fedadagrad" else 0.2)


def test_fedadam_keeps_screening_and_the_norm_bound(build, caplog):
    def nan_arrays(got):
        return ArrayRecord({k: Array(np.full(v.numpy().shape, np.nan)) for k, v in got.items()})

    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = build("fedadam", rounds=1, run_config={"strategy.server-learning-rate": 0.05})
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 1.0), 13: site("jinling", 10, 500.0),
                         14: site("xiangya", 10, 1.0, arrays=nan_arrays)})
    result = run(strategy, grid)
    assert "xiangya rejected: array w holds NaN" in caplog.text
    assert "train reply from jinling (node 13): update clipped onto robust.norm-factor 10 x" in caplog.text
    # jinling's +500 is clipped onto 10 x the median update norm (+10): the aggregated update is (1 + 1 + 10) / 3
    np.testing.assert_allclose(result.arrays["w"].numpy(), adam_step(4.0, 0.05), rtol=1e-5)
    assert np.isfinite(strategy.v_t["w"]).all()


def test_the_optimizer_is_logged_and_recorded(build, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = build("fedyogi", rounds=2)
    run(strategy, two_sites(), rounds=2)
    assert "server optimizer fedyogi (eta 0.01, tau 0.001, beta_1 0.9, beta_2 0.99)" in caplog.text
    document = json.loads((strategy.folder.dir / "metrics.json").read_text())
    assert document["server-optimizer"] == {"name": "fedyogi", "eta": 0.01, "tau": 1e-3, "beta_1": 0.9,
                                            "beta_2": 0.99}
    assert [r["round"] for r in document["rounds"]] == [1, 2]
    assert all(r["evaluate"] for r in document["rounds"])  # evaluate-in-train still scores every round
    plain = build("none", rounds=1, run_id=8)
    run(plain, two_sites(), rounds=1)
    assert json.loads((plain.folder.dir / "metrics.json").read_text())["server-optimizer"] == {"name": "none"}
    assert not list(plain.folder.dir.glob("*.npz"))  # no server optimizer, no state files


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_survives_a_checkpoint_and_a_resume(build, tmp_path, optimizer):
    config = {"strategy.server-momentum": 0.5, "strategy.server-learning-rate": 0.3}
    unbroken = build(optimizer, rounds=3, run_config=config, root=tmp_path / "a")
    expected = run(unbroken, two_sites(), rounds=3)

    first = build(optimizer, rounds=3, run_config=config, root=tmp_path / "b")
    run(first, two_sites(), rounds=1)
    point = find_resume_point(tmp_path / "b", "latest")
    assert server_optimizer_path(point.path.parent, 1).is_file()
    state = load_server_optimizer(point, optimizer)
    assert state and all(k.split("/", 1)[0] in {a for a, _ in FLOWER_STATE[optimizer]} for k in state)
    second = build(optimizer, rounds=3, run_config=config, root=tmp_path / "b", run_id=8, round_offset=point.round)
    second.restore_server_optimizer_state(state)
    checkpoint = load_checkpoint(point.path)
    result = second.start(grid=two_sites(), initial_arrays=ArrayRecord(checkpoint.state_dict), num_rounds=2,
                          timeout=5)

    for key in INITIAL:
        np.testing.assert_allclose(result.arrays[key].numpy(), expected.arrays[key].numpy(), rtol=1e-6)
        assert result.arrays[key].numpy().dtype == expected.arrays[key].numpy().dtype
    saved, continued = unbroken.server_optimizer_state(), second.server_optimizer_state()
    assert saved.keys() == continued.keys()
    for key in saved:
        np.testing.assert_allclose(continued[key], saved[key], rtol=1e-6)
    assert sorted(p.name for p in second.folder.dir.glob("*.npz")) == [
        "round-0002.server-optimizer.npz", "round-0003.server-optimizer.npz"]


def test_without_its_state_the_resume_is_refused(build, tmp_path):
    first = build("fedadam", rounds=2)
    run(first, two_sites(), rounds=1)
    point = find_resume_point(tmp_path, "latest")
    with pytest.raises(BrainTumNetError, match="holds fedadam state of round 1, expected fedyogi"):
        load_server_optimizer(point, "fedyogi")
    server_optimizer_path(point.path.parent, 1).unlink()
    with pytest.raises(BrainTumNetError, match="missing; resuming round 1 with strategy.server-optimizer=fedadam"):
        load_server_optimizer(point, "fedadam")


def test_a_resume_with_another_server_optimizer_is_refused(tmp_path):
    saved = resolve({"strategy.server-optimizer": "fedadam"})
    _check_compatible(saved, resolve({"strategy.server-optimizer": "fedadam", "strategy.server-tau": 0.01}),
                      tmp_path / "latest.pt")  # hyperparameters may change
    with pytest.raises(BrainTumNetError, match="trained with strategy.server-optimizer=fedadam; this run asks for "
                                               "fedavgm"):
        _check_compatible(saved, resolve({"strategy.server-optimizer": "fedavgm"}), tmp_path / "latest.pt")
    old = {k: v for k, v in to_dict(PROFILES["quick"]).items() if not k.startswith("server.")}
    assert from_dict(old).server == ServerOptimizerConfig(optimizer="none")  # from before the key: FedAvg
    with pytest.raises(BrainTumNetError, match="server-optimizer=none; this run asks for fedadam"):
        _check_compatible(from_dict(old), saved, tmp_path / "old.pt")


def test_a_state_that_does_not_fit_the_model_is_refused(build):
    strategy = build("fedadam", rounds=1)
    strategy.restore_server_optimizer_state({"m_t/w": np.zeros(4, np.float32), "m_t/n": np.zeros((), np.float64)})
    with pytest.raises(FederationError, match=r"fedadam state does not fit the model \(m_t differs at \['w'\]\)"):
        run(strategy, two_sites())


@pytest.mark.parametrize("bad, message", [
    ({"strategy.server-optimizer": "sgd"}, "strategy.server-optimizer='sgd': use one of"),
    ({"strategy.server-learning-rate": -0.1}, "strategy.server-learning-rate=-0.1: use a positive number"),
    ({"strategy.server-momentum": 1.0}, r"strategy.server-momentum=1.0: use a value in \[0, 1\)"),
    ({"strategy.server-beta2": -0.5}, "strategy.server-beta2=-0.5"),
    ({"strategy.server-tau": 0.0}, "strategy.server-tau=0.0: use a positive number"),
])
def test_bad_values_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        resolve(bad)


def test_zero_is_literal_and_the_default_learning_rates_are_ours_or_flowers():
    profile = resolve({"profile": "paper", "strategy.server-momentum": 0.0, "strategy.server-beta1": 0.0})
    assert (profile.server.momentum, profile.server.beta_1) == (0.0, 0.0)  # 0 is a value, not "the profile's"
    defaults = {name: server_optimizer_params(resolve({"strategy.server-optimizer": name})) for name in OPTIMIZERS}
    # the rates docs/federation.md, pyproject.toml and ServerOptimizerConfig quote for strategy.server-learning-rate=0
    assert {n: p.get("eta", p.get("server_learning_rate")) for n, p in defaults.items()} == {
        "fedavgm": 1.7, "fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1}  # fedavgm: ours, measured


@pytest.mark.parametrize("optimizer, flower", [("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedyogi", FedYogi),
                                               ("fedadagrad", FedAdagrad)])
def test_the_flower_internals_relied_on_are_there(build, optimizer, flower):
    """Fails when a Flower release renames or reshapes the attributes the state is kept in: update FLOWER_STATE,
    FLOWER_INTERNALS and FLOWER_CHECKED in server/optimizers.py together, after checking Flower's new maths."""
    import flwr

    assert flwr.__version__.split(".")[:2] == FLOWER_CHECKED.split(".")
    bare = flower()
    for attribute in [a for a, _ in FLOWER_STATE[optimizer]] + list(FLOWER_INTERNALS):
        assert hasattr(bare, attribute), f"Flower's {flower.__name__} has no {attribute} any more"
    strategy = build(optimizer, rounds=2, run_config={"strategy.server-momentum": 0.5})
    run(strategy, two_sites(), rounds=2)
    for attribute, container in FLOWER_STATE[optimizer]:
        value = getattr(strategy, attribute)
        assert isinstance(value, container) and len(value) == len(INITIAL), (attribute, type(value))


def test_another_flower_version_is_refused(build, monkeypatch):
    monkeypatch.setattr(optimizers_module, "FLWR_VERSION", "1.43.0")
    with pytest.raises(FederationError, match="checked with flwr 1.42 .* flwr 1.43.0 is installed"):
        build("fedadam")
    assert isinstance(build("none"), SiteAwareFedAvg)  # plain FedAvg relies on none of them
