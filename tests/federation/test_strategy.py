"""SiteAwareFedAvg in-process, over a scripted Grid: aggregation, per-site attribution, bad replies, dropout, waiting.

The loopback tests (test_loopback.py) run the same strategy with real processes; these check the rules in a second.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from braintumnet.checkpoint import load_checkpoint
from braintumnet.config import resolve
from braintumnet.errors import BrainTumNetError
from server.checkpoints import RunFolder, find_resume_point
from server.aggregation import nan_weighted_mean
from server.screening import reply_problem
from server.settings import FederationError, ServerSettings
from server.strategy import SiteAwareFedAvg
from server.tracking import Tracker

# Flower's Message constructor reads the process's task identity: the shared fixture in tests/conftest.py sets one.
pytestmark = pytest.mark.usefixtures("task_identity")

SUPERLINK = 1  # Flower's node id for messages the SuperLink makes itself (e.g. "node unavailable")


class ScriptedGrid(Grid):
    """Nodes answer through ``behaviour[node](message) -> reply content | Error | None (no reply)``; the role query
    is answered here (a ``gone`` node with an Error), with the node's role in ``roles`` (default training)."""

    def __init__(self, behaviour: dict, names: dict[int, str] | None = None, roles: dict[int, str] | None = None):
        self.behaviour, self.names, self.roles = behaviour, names or {}, roles or {}
        self.pending: dict[str, Message] = {}
        self.sent: list[tuple[int, str]] = []  # (node, message type) of every message pushed

    def set_run(self, run): pass

    @property
    def run(self): return None

    def create_message(self, *a, **k): raise NotImplementedError

    def get_node_ids(self): return list(self.behaviour)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.behaviour]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.sent.append((m.metadata.dst_node_id, m.metadata.message_type))
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pending[m.object_id] = m
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is None:
                continue
            behaviour = self.behaviour[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.QUERY:
                answer = behaviour(msg) if behaviour is gone else RecordDict({"site": ConfigRecord(
                    {"role": self.roles.get(msg.metadata.dst_node_id, "training")})})
            else:
                answer = behaviour(msg)
            if answer is None:
                continue
            reply = Message(answer, reply_to=msg)
            # An Error here plays a SuperLink-made "node unavailable" reply: it comes from the SuperLink, not the node.
            sender = SUPERLINK if isinstance(answer, Error) else msg.metadata.dst_node_id
            reply.metadata.__dict__["_src_node_id"] = sender
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def site(name: str, n: int, shift: float, auc: float = 0.8, extra: dict | None = None, arrays=None):
    """A well-behaved site: adds ``shift`` to every array (keeping its dtype, as a site's state dict does), reports
    ``n`` examples."""

    def answer(msg: Message):
        if msg.metadata.message_type == MessageType.TRAIN:
            got = msg.content["arrays"]
            shifted = ArrayRecord({k: Array(np.asarray(v.numpy() + shift).astype(v.numpy().dtype))
                                   for k, v in got.items()})
            new = arrays(got) if arrays else shifted
            metrics = {"train_loss": shift, "num-examples": n, "seconds": 0.1}
            if msg.content["config"].get("evaluate-received"):  # evaluate-in-train: scores of the received model
                metrics.update({"received_dice_tumor": shift, "received_auc": auc, "received_num-examples": n})
            return RecordDict({"arrays": new, "metrics": MetricRecord({**metrics, **(extra or {})}),
                               "site": ConfigRecord({"name": name})})
        metrics = {"dice_tumor": shift, "auc": auc, "num-examples": n, "seconds": 0.1}
        return RecordDict({"metrics": MetricRecord({**metrics, **(extra or {})}), "site": ConfigRecord({"name": name})})

    return answer


def gone(msg: Message):
    return Error(code=3, reason="Node Unavailable")


@pytest.fixture()
def make_strategy(tmp_path):
    def make(rounds=1, run_config=None, audit=False, evaluate_in_train=True, run_id=7, round_offset=0, **federation):
        base = resolve({"profile": "quick", "data.img-size": 32, "model.feature-size": 8, **(run_config or {})})
        settings = {"num_rounds": rounds, "min_available_nodes": 1, "min_train_nodes": 1, "min_evaluate_nodes": 1,
                    **federation}
        profile = replace(base, federation=replace(base.federation, **settings))
        settings = ServerSettings(checkpoint_dir=tmp_path, sites=("yibin", "plagh", "jinling"), audit_messages=audit,
                                  evaluate_in_train=evaluate_in_train)
        tracker = Tracker(tmp_path, "", "t", "f", {}, {}, enabled=False)
        return SiteAwareFedAvg(profile=profile, settings=settings, folder=RunFolder(tmp_path, run_id), tracker=tracker,
                               class_names=("glioma", "metastasis", "meningioma"), round_offset=round_offset,
                               meta={"federation-id": "f"})
    return make


INITIAL = {"w": torch.zeros(3), "n": torch.tensor(0, dtype=torch.int64)}


def run(strategy, grid, rounds=1):
    return strategy.start(grid=grid, initial_arrays=ArrayRecord(INITIAL), num_rounds=rounds, timeout=5,
                          train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))


def test_weighted_average_and_per_site_metrics(make_strategy):
    strategy = make_strategy()
    result = run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 30, 2.0, auc=math.nan)}))
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full(3, (10 * 1 + 30 * 2) / 40))
    assert result.arrays["n"].numpy().dtype == np.int64  # integer buffers keep their dtype
    record = strategy.history[0]
    assert record["train"]["train_loss"] == pytest.approx(1.75)
    assert record["evaluate"]["dice_tumor"] == pytest.approx(1.75)
    assert record["evaluate"]["auc"] == pytest.approx(0.8)  # NaN at plagh: averaged over the site that has it
    assert set(record["sites"]) == {"yibin", "plagh"}
    assert record["sites"]["plagh"]["evaluate"]["num-examples"] == 30
    checkpoint = load_checkpoint(strategy.folder.dir / "latest.pt")
    assert checkpoint.meta["round"] == 1
    assert (strategy.folder.dir / "round-0001.pt").is_file() and (strategy.folder.dir / "best.pt").is_file()


def test_error_and_bad_replies_are_left_out_with_the_site_named(make_strategy, caplog):
    def nan_arrays(got):
        return ArrayRecord({k: Array(np.full(v.numpy().shape, np.nan)) for k, v in got.items()})

    grid = ScriptedGrid({
        11: site("yibin", 10, 1.0),
        12: site("plagh", 10, 3.0),
        13: site("jinling", 10, 5.0, arrays=nan_arrays),
        14: site("external", 10, 7.0, extra={"surprise": 1.0}),
        15: gone,
    }, names={15: "xiangya"})
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    result = run(make_strategy(), grid)
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full(3, 2.0))  # yibin and plagh only
    text = caplog.text
    assert "jinling rejected: array w holds NaN" in text
    assert "external rejected: metric keys differ" in text
    # a SuperLink-made error, traced to its node's name: the node never got a model
    assert "xiangya did not answer the role query (Node Unavailable)" in text


def test_too_few_replies_keep_the_model(make_strategy, caplog):
    strategy = make_strategy(min_train_nodes=2, min_evaluate_nodes=1)
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: gone}))
    assert "fewer than min-train-nodes=2; the global model stays" in caplog.text
    assert strategy.history[0]["skipped"]
    np.testing.assert_allclose(strategy.arrays["w"].numpy(), 0.0)  # what the next round and final.pt start from


def test_evaluation_can_be_switched_off(make_strategy):
    strategy = make_strategy(fraction_evaluate=0.0)
    asked = []
    answer = site("yibin", 10, 1.0)
    run(strategy, ScriptedGrid({11: lambda m: asked.append(m.metadata.message_type) or answer(m)}))
    assert asked == [MessageType.TRAIN] and strategy.history[0]["evaluate"] == {}
    assert (strategy.folder.dir / "round-0001.pt").is_file()


def test_waiting_for_nodes_is_logged_and_bounded(make_strategy, caplog):
    strategy = make_strategy(min_available_nodes=3, wait_for_nodes_s=2.0)
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    with pytest.raises(FederationError, match=r"gave up after waiting 2 s .* 1 connected \(yibin\), 3 needed"):
        run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0)}, names={11: "yibin"}))
    assert ("waiting for nodes: 1 connected (yibin), 3 needed; expected sites not seen yet: plagh, jinling"
            in caplog.text)


def test_rounds_continue_after_resume(make_strategy, tmp_path):
    first = make_strategy(rounds=3)
    run(first, ScriptedGrid({11: site("yibin", 10, 1.0)}), rounds=1)
    point = find_resume_point(tmp_path, "latest")
    assert point.round == 1
    second = make_strategy(rounds=3, run_id=8, round_offset=point.round)
    seen = []
    answer = site("yibin", 10, 1.0)
    run(second, ScriptedGrid({11: lambda m: seen.append(m.content["config"]["server-round"]) or answer(m)}), rounds=2)
    assert seen == [2, 3, 3]  # train of global rounds 2 and 3, round 3's evaluate (round 2 scored in round 3's train)
    assert [r["evaluate"]["dice_tumor"] for r in second.history] == [1.0, 1.0]
    assert sorted(p.name for p in second.folder.dir.glob("round-*.pt")) == ["round-0002.pt", "round-0003.pt"]


def test_nan_weighted_mean_and_reply_checks():
    def rec(**m):
        return RecordDict({"metrics": MetricRecord(m)})

    out = nan_weighted_mean([rec(a=1.0, b=math.nan, **{"num-examples": 1}),
                             rec(a=3.0, b=math.nan, **{"num-examples": 3})], "num-examples")
    assert out["a"] == pytest.approx(2.5) and math.isnan(out["b"])
    ref = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    ok = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                     "metrics": MetricRecord({"num-examples": 2})})
    assert reply_problem(ok, ref, {"num-examples"}) is None
    wrong_shape = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(4, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 2})})
    assert "shape" in reply_problem(wrong_shape, ref, None)
    zero = RecordDict({"metrics": MetricRecord({"num-examples": 0})})
    assert "positive" in reply_problem(zero, None, None)


def test_benchmark_evaluation_on_a_site_folder(phantom_root, cache_root, tiny_profile):
    """The centre prepares a public benchmark set once and evaluates the global model on all of its cases."""
    from braintumnet.engine import build_model
    from server.app import _external_evaluator

    settings = ServerSettings(checkpoint_dir=cache_root, external_data=str(phantom_root / "external"),
                              cache_dir=str(cache_root))
    evaluate = _external_evaluator(settings, tiny_profile)
    metrics = evaluate(build_model(tiny_profile).state_dict())
    assert metrics["num-examples"] == metrics["n_cases"] > 0 and 0.0 <= metrics["dice_tumor"] <= 1.0
    with pytest.raises(BrainTumNetError, match="neither a site folder"):
        _external_evaluator(ServerSettings(checkpoint_dir=cache_root, external_data=str(cache_root / "nothing")),
                            tiny_profile)


def test_the_evaluate_only_site_scores_every_round_and_never_trains(make_strategy):
    """The external hospital: asked its role once, never sent a train message, sent the global model every round
    (evaluate-in-train or not), its scores filed as the round's ``external`` entry, apart from the federated ones."""
    strategy = make_strategy(rounds=2)
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 30, 2.0), 13: site("jinling", 10, 3.0),
                         14: site("external", 5, 0.5)}, roles={14: "evaluate-only"})
    run(strategy, grid, rounds=2)
    external = [t for n, t in grid.sent if n == 14]
    assert external == [MessageType.QUERY, MessageType.EVALUATE, MessageType.EVALUATE]
    assert [t for n, t in grid.sent if n == 11] == [MessageType.QUERY, MessageType.TRAIN, MessageType.TRAIN,
                                                    MessageType.EVALUATE]
    rounds = strategy.history
    assert [r["external"]["dice_tumor"] for r in rounds] == [0.5, 0.5]
    assert all(r["external"]["num-examples"] == 5 for r in rounds)
    assert [r["sites"]["external"]["external"]["dice_tumor"] for r in rounds] == [0.5, 0.5]
    assert all("train" not in r["sites"]["external"] and "evaluate" not in r["sites"]["external"] for r in rounds)
    assert rounds[0]["evaluate"]["dice_tumor"] == pytest.approx((10 * 1 + 30 * 2 + 10 * 3) / 50)  # training sites
    assert strategy.book.rounds[0].mlflow_metrics()["external/dice_tumor"] == 0.5


def test_a_round_completes_without_the_evaluate_only_site(make_strategy, caplog):
    """The external hospital down (its SuperNode gone after the role query): the round completes, without scores."""
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(rounds=1, min_available_nodes=3, min_train_nodes=2)
    down = {"now": False}
    external = site("external", 5, 0.5)
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 30, 2.0),
                         14: lambda m: gone(m) if down["now"] else external(m)}, roles={14: "evaluate-only"})
    down["now"] = True
    run(strategy, grid)
    assert (14, MessageType.TRAIN) not in grid.sent and (14, MessageType.EVALUATE) in grid.sent
    record = strategy.history[0]
    assert not record["skipped"] and record["external"] == {} and record["evaluate"]["dice_tumor"] > 0
    assert "no external scores this round" in caplog.text


def test_a_site_without_an_answer_to_the_role_query_gets_no_model(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(rounds=1)
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: gone}, names={12: "plagh"})
    run(strategy, grid)
    assert [t for n, t in grid.sent if n == 12] == [MessageType.QUERY]
    assert "plagh did not answer the role query (Node Unavailable); not sampled this round" in caplog.text


def test_an_evaluate_only_site_does_not_count_towards_the_training_sites(make_strategy):
    strategy = make_strategy(min_available_nodes=2, min_train_nodes=2, wait_for_nodes_s=2.0)
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 14: site("external", 5, 0.5)}, names={11: "yibin", 14: "external"},
                        roles={14: "evaluate-only"})
    with pytest.raises(FederationError, match=r"2 connected \(external, yibin; 1 of them evaluate-only, which never "
                                              r"train\), 2 needed"):
        run(strategy, grid)
    assert (14, MessageType.TRAIN) not in grid.sent


def test_sites_entries_name_the_evaluate_only_sites():
    settings = ServerSettings.from_run_config({"sites": "yibin,plagh,external:evaluate-only"})
    assert settings.sites == ("yibin", "plagh", "external") and settings.evaluate_only == ("external",)
    assert settings.training_sites == ("yibin", "plagh")
    with pytest.raises(BrainTumNetError, match="external:observer.*evaluate-only"):
        ServerSettings.from_run_config({"sites": "yibin,external:observer"})


# ---- update validation, robust aggregation, privacy budgets, the message audit --------------------------


def test_a_poisoned_update_is_rejected_and_a_scaled_one_clipped(make_strategy, prepared_sites, tiny_profile, caplog):
    """Real tiny BrainTumNet updates from two honest sites, a NaN one and one scaled x100: the run completes, the NaN
    reply is rejected, the scaled update is clipped in every parameter group onto 10 x the group's median norm, and the
    model is FedAvg of the honest two and the clipped one."""
    from braintumnet.engine import build_model, train_model

    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in build_model(tiny_profile).state_dict().items()}
    trained = {}

    def trained_on(name: str, got: ArrayRecord) -> dict:
        if name not in trained:
            model = build_model(tiny_profile)
            model.load_state_dict(got.to_torch_state_dict())
            stats = train_model(model, [prepared_sites[name]], tiny_profile, torch.device("cpu"), epochs=1,
                                progress=False)
            trained[name] = ({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
                             stats["num-examples"])
        return trained[name]

    def real(name: str, poison=None):
        def answer(msg: Message):
            if msg.metadata.message_type != MessageType.TRAIN:
                return RecordDict({"metrics": MetricRecord({"dice_tumor": 0.5, "num-examples": 3, "seconds": 0.1}),
                                   "site": ConfigRecord({"name": name})})
            got = msg.content["arrays"]
            state, n = trained_on("yibin" if name == "nan-site" else name, got)
            if poison:
                state = poison({k: v.numpy() for k, v in got.items()}, state)
            return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                               "metrics": MetricRecord({"train_loss": 1.0, "num-examples": n, "seconds": 0.1}),
                               "site": ConfigRecord({"name": name})})
        return answer

    def scaled(sent, state):
        return {k: sent[k] + 100.0 * (v - sent[k]) if v.dtype.kind == "f" else v for k, v in state.items()}

    def with_nan(sent, state):
        first = next(k for k, v in state.items() if v.dtype.kind == "f")
        return {**state, first: np.full_like(state[first], np.nan)}

    grid = ScriptedGrid({11: real("yibin"), 12: real("plagh"), 13: real("jinling", scaled),
                         14: real("nan-site", with_nan)})
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1, timeout=5,
                            train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    sent = {k: v.numpy().astype(np.float64) for k, v in initial.items()}
    updates = {s: {k: v - sent[k] for k, v in trained[s][0].items()} for s in ("yibin", "plagh")}
    updates["jinling"] = {k: 100.0 * (v - sent[k]) for k, v in trained["jinling"][0].items()}
    groups = sorted({k.split(".")[0] for k in initial})

    def norm(update, group):
        return math.sqrt(sum(float(np.sum(v ** 2)) for k, v in update.items()
                             if k.split(".")[0] == group and v.dtype.kind == "f"))

    record = strategy.history[0]
    weights = {s: record["sites"][s]["train"].get("weight_capped", trained[s][1]) for s in updates}
    for group in groups:
        norms = {s: norm(u, group) for s, u in updates.items()}
        bound = 10 * sorted(norms.values())[1]
        assert norms["jinling"] > bound  # x100 is far above 10 x the median in every group
        assert record["clipped"]["jinling"][group] == {"norm": pytest.approx(norms["jinling"]),
                                                       "bound": pytest.approx(bound)}
        for key in (k for k in initial if k.split(".")[0] == group and initial[k].is_floating_point()):
            clipped = sent[key] + (bound / norms["jinling"]) * updates["jinling"][key]
            expected = sum(weights[s] * (sent[key] + updates[s][key] if s != "jinling" else clipped)
                           for s in updates) / sum(weights.values())
            np.testing.assert_allclose(result.arrays[key].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
    assert "nan-site rejected: array" in caplog.text and "NaN or infinite" in caplog.text
    assert "train reply from jinling (node 13): update clipped onto robust.norm-factor 10 x" in caplog.text
    assert set(record["rejected"]["train"]) == {"nan-site"}
    assert record["nodes"] == {"yibin": 11, "plagh": 12, "jinling": 13, "nan-site": 14}
    train = {s: record["sites"][s]["train"] for s in ("yibin", "plagh", "jinling")}
    assert train["jinling"]["update_norm"] > 10 * max(train["yibin"]["update_norm"], train["plagh"]["update_norm"])
    assert train["jinling"]["update_norm_clipped"] < train["jinling"]["update_norm"] / 5
    assert "update_norm_clipped" not in train["yibin"] and "update_norm_clipped" not in train["plagh"]


@pytest.mark.parametrize("rule, extra, expected", [
    ("median", {}, 2.0),
    ("trimmed-mean", {"strategy.trim-fraction": 0.34}, 2.0),  # drops one site at each end of three
    ("fedavg", {"robust.max-weight-share": 0.0}, (10 * 1.0 + 10 * 2.0 + 40 * 9.0) / 60),  # the weight cap off
])
def test_robust_aggregation_rules(make_strategy, rule, extra, expected):
    strategy = make_strategy(run_config={"strategy.aggregation": rule, "robust.norm-factor": 0.0, **extra})
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0), 13: site("jinling", 40, 9.0)})
    result = run(strategy, grid)
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full(3, expected))
    assert result.arrays["n"].numpy().dtype == np.int64


def three(attacker):
    """Two honest sites (10 and 30 slices, updates +1 and +2) and a third replying through ``attacker``."""
    return ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 30, 2.0), 13: attacker})


def test_a_site_claiming_a_huge_weight_cannot_take_over_the_model(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy()
    result = run(strategy, three(site("mallory", 10 ** 12, 9.0)))
    w = result.arrays["w"].numpy()
    assert not np.allclose(w, 9.0)  # FedAvg by the claimed weight: the attacker's model
    # clipped to 40, the others' total: half of the aggregate's weight
    np.testing.assert_allclose(w, (10 * 1.0 + 30 * 2.0 + 40 * 9.0) / 80)
    assert "mallory: num-examples 1e+12 clipped to 40 (robust.max-weight-share 0.5 of 3 sites)" in caplog.text
    sites = strategy.history[0]["sites"]
    assert sites["mallory"]["train"]["weight_capped"] == 40 and sites["mallory"]["train"]["num-examples"] == 10 ** 12


def test_an_infinite_weight_is_rejected_and_the_model_stays_finite(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy()
    result = run(strategy, three(site("mallory", math.inf, 9.0)))
    assert np.isfinite(result.arrays["w"].numpy()).all()
    np.testing.assert_allclose(result.arrays["w"].numpy(), (10 * 1.0 + 30 * 2.0) / 40)
    reason = strategy.history[0]["rejected"]["train"]["mallory"]
    assert reason == "num-examples must be a finite positive integer, got inf"
    assert "train reply from mallory rejected: num-examples must be a finite positive integer" in caplog.text


@pytest.mark.parametrize("weight", [math.nan, 2.5, -3, 0])
def test_a_weight_that_is_not_a_count_is_rejected(weight):
    content = RecordDict({"metrics": MetricRecord({"num-examples": weight})})
    assert "finite positive integer" in reply_problem(content, None, None)


def test_an_integer_array_cannot_bypass_the_nan_and_norm_checks(make_strategy):
    def as_int64(got):  # no NaN check for integers, an update norm of 0, then cast back to float32 unchecked
        return ArrayRecord({"w": Array(np.full(3, 10 ** 11, np.int64)), "n": Array(np.asarray(got["n"].numpy()))})

    strategy = make_strategy()
    result = run(strategy, three(site("mallory", 10, 0.0, arrays=as_int64)))
    np.testing.assert_allclose(result.arrays["w"].numpy(), (10 * 1.0 + 30 * 2.0) / 40)
    assert strategy.history[0]["rejected"]["train"]["mallory"] == (
        "array w has dtype int64, the global model's is float32")


def test_the_weight_cap_clips_only_a_site_above_its_share(make_strategy):
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0), 13: site("jinling", 40, 9.0)})
    strategy = make_strategy(run_config={"robust.norm-factor": 0.0})
    result = run(strategy, grid)
    np.testing.assert_allclose(result.arrays["w"].numpy(), (10 * 1.0 + 10 * 2.0 + 20 * 9.0) / 40)  # 40 -> 20
    sites = strategy.history[0]["sites"]
    assert sites["jinling"]["train"]["weight_capped"] == 20
    assert "weight_capped" not in sites["yibin"]["train"] and "weight_capped" not in sites["plagh"]["train"]
    from server.robust import weight_cap

    assert weight_cap([10, 30, 40], 0.5) is None  # 40 of 80: at the share, not above it
    assert weight_cap([1, 1, 100, 100], 0.4) == pytest.approx(4.0)  # two clipped: 4 of 10 each
    assert weight_cap([1, 2, 3], 0.2) == 1  # below 1/3: equal weights are the closest
    assert weight_cap([10, 10 ** 12], 0.5) is None  # two sites: not applied (a documented limit)


def test_a_trimmed_mean_that_trims_nothing_says_so_and_is_refused(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(run_config={"strategy.aggregation": "trimmed-mean", "strategy.trim-fraction": 0.2})
    run(strategy, three(site("jinling", 10, 3.0)))
    shortfall = ("strategy.aggregation trimmed-mean with strategy.trim-fraction 0.2 trims no site of 3 replies (it "
                 "needs 5 or more")
    # said before round 1
    assert f"with the 3 expected training sites (yibin, plagh, jinling): {shortfall}" in caplog.text
    assert f"round 1: {shortfall}" in caplog.text and "the round's aggregate is refused" in caplog.text
    np.testing.assert_allclose(strategy.arrays["w"].numpy(), 0.0)  # not the plain mean 2.0: the model stays
    record = strategy.history[0]
    assert record["skipped"] and record["refused"].startswith(shortfall) and record["train"] == {}


def test_the_norm_bound_needs_a_reference_and_can_be_switched_off(make_strategy):
    two = run(make_strategy(), ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 500.0)}))
    # round 1 with two replies: no median and nothing carried from an earlier round, so not bounded
    np.testing.assert_allclose(two.arrays["w"].numpy(), 250.5)
    off = run(make_strategy(run_config={"robust.norm-factor": 0.0}),
              ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 1.0), 13: site("x", 10, 500.0)}))
    np.testing.assert_allclose(off.arrays["w"].numpy(), 502.0 / 3)


def test_a_site_whose_budget_is_spent_is_left_out_but_still_evaluates(make_strategy, caplog):
    def spent(msg: Message):
        if msg.metadata.message_type == MessageType.TRAIN:
            return RecordDict({"metrics": MetricRecord({"train_loss": math.nan, "num-examples": 0, "seconds": 0.1,
                                                        "dp_epsilon": 2.5, "dp_budget_spent": 1}),
                               "site": ConfigRecord({"name": "plagh"})})
        return site("plagh", 10, 3.0)(msg)

    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(run_config={"dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.max-epsilon": 2.5})
    sent = []
    trains, evaluates = site("yibin", 10, 1.0, extra={"dp_epsilon": 1.5, "dp_budget_spent": 0}), site("yibin", 10, 1.0)

    def honest(msg: Message):
        sent.append(msg.content["config"])
        return (trains if msg.metadata.message_type == MessageType.TRAIN else evaluates)(msg)

    result = run(strategy, ScriptedGrid({11: honest, 12: spent}))
    np.testing.assert_allclose(result.arrays["w"].numpy(), 1.0)  # yibin's update alone
    assert "plagh's privacy budget is spent (epsilon 2.500, dp.max-epsilon 2.5)" in caplog.text
    record = strategy.history[0]
    assert record["privacy"] == {"epsilon": {"yibin": 1.5, "plagh": 2.5}, "epsilon_max": 2.5,
                                 "budget_spent": ["plagh"]}
    assert record["evaluate"]["dice_tumor"] == pytest.approx(2.0)  # plagh evaluated: (10*1 + 10*3) / 20
    assert "dp_epsilon" not in record["train"]  # a site's own figure, not averaged
    assert sent[0]["federation-id"] == "f"  # keys the sites' privacy ledgers


def test_the_audit_describes_every_message_without_array_contents(make_strategy):
    strategy = make_strategy(audit=True)
    run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: gone}))
    lines = [json.loads(x) for x in strategy.folder.audit_path.read_text().splitlines()]
    assert [(e["direction"], e["type"]) for e in lines] == [
        ("to-site", "query"), ("to-site", "query"), ("from-site", "query"), ("from-site", "query"),
        ("to-site", "train"), ("from-site", "train"), ("screening", "train"),
        ("to-site", "evaluate"), ("from-site", "evaluate"), ("screening", "evaluate")]
    answers = {e["node"]: e for e in lines[2:4]}
    assert answers[12]["error"]["reason"] == "Node Unavailable"  # and no model was ever sent to node 12
    assert answers[11]["records"]["site"] == {"kind": "config", "items": {"role": "training"}}
    assert lines[6]["replies"] == [{"node": 11, "name": "yibin", "outcome": "kept"}]
    reply = next(e for e in lines if e["direction"] == "from-site" and "records" in e and e["type"] == "train")
    assert reply["records"]["arrays"] == {"kind": "array", "items": {"w": {"shape": [3], "dtype": "float32"},
                                                                     "n": {"shape": [], "dtype": "int64"}}}
    assert reply["records"]["site"] == {"kind": "config", "items": {"name": "yibin"}}
    assert any(e.get("error", {}).get("reason") == "Node Unavailable" for e in lines)


def test_evaluate_in_train_scores_each_round_in_the_next_train_message(make_strategy):
    """One model download per site per round: the sites score the model they receive before training; only the last
    round has an evaluate message. Each round's metrics, checkpoint meta and ``best`` still land on that round."""
    strategy = make_strategy(rounds=3)
    asked = []

    def scores(got: ArrayRecord) -> float:  # a "Dice" that grows with the weights: round 3's model is the best
        return float(got["w"].numpy().mean())

    def answer(name, n):
        def reply(msg: Message):
            config, got = msg.content["config"], msg.content["arrays"]
            asked.append((name, msg.metadata.message_type, config["server-round"], bool(config.get("evaluate-received"))))
            if msg.metadata.message_type == MessageType.TRAIN:
                metrics = {"train_loss": 0.5, "num-examples": n, "seconds": 0.1}
                if config.get("evaluate-received"):
                    metrics.update({"received_dice_tumor": scores(got), "received_num-examples": n})
                arrays = ArrayRecord({k: Array(np.asarray(v.numpy() + 1).astype(v.numpy().dtype))
                                      for k, v in got.items()})
                return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                                   "site": ConfigRecord({"name": name})})
            return RecordDict({"metrics": MetricRecord({"dice_tumor": scores(got), "num-examples": n, "seconds": 0.1}),
                               "site": ConfigRecord({"name": name})})
        return reply

    run(strategy, ScriptedGrid({11: answer("yibin", 10), 12: answer("plagh", 30)}), rounds=3)
    yibin = [(t, r, e) for s, t, r, e in asked if s == "yibin"]
    assert yibin == [(MessageType.TRAIN, 1, False), (MessageType.TRAIN, 2, True), (MessageType.TRAIN, 3, True),
                     (MessageType.EVALUATE, 3, False)]
    rounds = strategy.history
    assert [r["evaluate"]["dice_tumor"] for r in rounds] == pytest.approx([1.0, 2.0, 3.0])  # after rounds 1, 2, 3
    assert rounds[0]["sites"]["plagh"]["evaluate"] == {"dice_tumor": 1.0, "num-examples": 30}
    assert all(not any(k.startswith("received_") for k in r["train"]) for r in rounds)
    assert all(not any(k.startswith("received_") for k in p["train"]) for r in rounds for p in r["sites"].values())
    folder = strategy.folder.dir
    assert load_checkpoint(folder / "round-0001.pt").meta["evaluate"]["dice_tumor"] == pytest.approx(1.0)
    assert load_checkpoint(folder / "best.pt").meta["round"] == 3
    assert load_checkpoint(folder / "latest.pt").meta["round"] == 3
    saved = json.loads((folder / "metrics.json").read_text())["rounds"]
    assert [r["evaluate"]["dice_tumor"] for r in saved] == pytest.approx([1.0, 2.0, 3.0])
    model_bytes = 3 * 4 + 8  # w: 3 float32 (arrays' header bytes are not counted) and n
    down = [r["bytes_per_site"]["yibin"]["down"] for r in rounds]
    assert down[0] == down[1] and down[2] == 2 * down[0]  # one download per round, two in the last
    assert down[0] >= model_bytes


def test_evaluate_in_train_can_be_switched_off(make_strategy):
    strategy = make_strategy(rounds=2, evaluate_in_train=False)
    asked = []
    answer = site("yibin", 10, 1.0)
    run(strategy, ScriptedGrid({11: lambda m: asked.append((m.metadata.message_type,
                                                             "evaluate-received" in m.content["config"])) or answer(m)}),
        rounds=2)
    assert asked == [(MessageType.TRAIN, False), (MessageType.EVALUATE, False)] * 2


# ---- the message format: the centre uses braintumnet.protocol's names -----------------------------------------------

# Protocol names that are message keys only. FEDERATION_ID's spelling is also the run folder's meta key and an MLflow
# tag, SECONDS's a metrics.json block, SITE_NAME's and CONFIG's ordinary words: those formats keep their own names.
MESSAGE_ONLY = ("ARRAYS", "METRICS", "SITE", "SERVER_ROUND", "TOTAL_ROUNDS", "EVALUATE_RECEIVED", "WEIGHT_KEY",
                "RECEIVED_PREFIX", "DP_EPSILON", "DP_BUDGET_SPENT", "PACKED_LAYOUT", "PACKED_PREFIX",
                "EVALUATE_SECONDS")


def test_no_server_module_spells_a_message_key_itself():
    """A key the centre spelled itself would silently stop matching the sites when the protocol renames it."""
    import ast
    from pathlib import Path

    import braintumnet.protocol as protocol
    import server

    keys = {getattr(protocol, name): name for name in MESSAGE_ONLY}
    found = []
    for path in sorted(Path(server.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in keys:
                found.append(f"{path.name}:{node.lineno} {node.value!r} (braintumnet.protocol.{keys[node.value]})")
    assert not found, "use braintumnet.protocol's names: " + "; ".join(found)


def test_the_instructions_carry_the_protocols_config_keys(make_strategy):
    from braintumnet.protocol import EVALUATE_RECEIVED, FEDERATION_ID, SERVER_ROUND, TOTAL_ROUNDS

    strategy = make_strategy(rounds=2)
    configs = []
    answer = site("yibin", 10, 1.0)
    run(strategy, ScriptedGrid({11: lambda m: configs.append((m.metadata.message_type, set(m.content["config"])))
                                or answer(m)}), rounds=2)
    # the federation id on evaluate messages too: a site counts its evaluations per federation
    assert configs == [(MessageType.TRAIN, {SERVER_ROUND, TOTAL_ROUNDS, FEDERATION_ID}),
                       (MessageType.TRAIN, {SERVER_ROUND, TOTAL_ROUNDS, FEDERATION_ID, EVALUATE_RECEIVED}),
                       (MessageType.EVALUATE, {SERVER_ROUND, FEDERATION_ID})]


def test_the_centres_keys_are_typed_by_the_one_reader():
    """ServerSettings reads its keys through braintumnet.config.app_config: one boolean parser for every key."""
    from braintumnet.errors import BrainTumNetError
    from server.settings import ServerSettings

    settings = ServerSettings.from_run_config({"audit-messages": "true", "evaluate-in-train": False,
                                               "sites": "a, b"})
    assert settings.audit_messages is True and settings.evaluate_in_train is False and settings.sites == ("a", "b")
    with pytest.raises(BrainTumNetError, match="audit-messages"):
        ServerSettings.from_run_config({"audit-messages": "maybe"})
