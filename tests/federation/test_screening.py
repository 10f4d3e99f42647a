"""The centre's screening of train replies against a site that wants to take over or wipe the global model: replies
held by node id (two nodes claiming one site name), updates clipped per parameter group onto a bound that also works
with one or two replies, and a robust rule that cannot work refused instead of averaging.

In-process over test_strategy.py's scripted Grid; each test fails on a centre that keyed replies by site name, dropped
or kept whole updates by the whole-model norm of 3+ replies only, or averaged when its robust rule could not work.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

# The scripted Grid, its sites and the strategy fixture are test_strategy.py's; pytest finds the imported fixtures here.
# ruff: noqa: F811
from test_strategy import ScriptedGrid, gone, make_strategy, run, site  # noqa: F401 (make_strategy: a fixture)

# Flower's Message constructor reads the process's task identity: the shared fixture in tests/conftest.py sets one.
pytestmark = pytest.mark.usefixtures("task_identity")


def groups_site(name: str, n: int, shifts: dict[str, float]):
    """A site whose update adds ``shifts[group]`` to every weight of that parameter group (``group.x`` keys)."""

    def answer(msg: Message):
        if msg.metadata.message_type == MessageType.TRAIN:
            got = msg.content["arrays"]
            new = {k: Array(np.asarray(v.numpy() + shifts[k.split(".")[0]], dtype=v.numpy().dtype))
                   for k, v in got.items()}
            return RecordDict({"arrays": ArrayRecord(new),
                               "metrics": MetricRecord({"train_loss": 1.0, "num-examples": n, "seconds": 0.1}),
                               "site": ConfigRecord({"name": name})})
        return RecordDict({"metrics": MetricRecord({"dice_tumor": 0.5, "auc": 0.8, "num-examples": n,
                                                    "seconds": 0.1}),
                           "site": ConfigRecord({"name": name})})

    return answer


def by_round(*answers):
    """A node that answers round r's messages with ``answers[r - 1]`` (None: it is gone that round)."""

    def answer(msg: Message):
        return (answers[msg.content["config"]["server-round"] - 1] or gone)(msg)

    return answer


@pytest.mark.parametrize("registered", [{}, {11: "yibin", 14: "yibin"}], ids=["claimed", "registered"])
def test_two_nodes_claiming_one_site_name_are_both_left_out(make_strategy, caplog, registered):
    """A second node calling itself yibin (a hostile duplicate, or the old SuperNode left running after a key rotation,
    both keys registered under the name) with a huge weight: neither yibin reply is used, both node ids stay in the
    record and the audit."""
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(audit=True)
    grid = ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0), 13: site("jinling", 30, 3.0),
                         14: site("yibin", 10 ** 6, 9.0)}, names=registered)
    result = run(strategy, grid)
    np.testing.assert_allclose(result.arrays["w"].numpy(), (10 * 2.0 + 30 * 3.0) / 40)  # plagh and jinling only
    record = strategy.history[0]
    assert record["evaluate"]["dice_tumor"] == pytest.approx((10 * 2.0 + 30 * 3.0) / 40)
    for phase in ("train", "evaluate"):
        rejected = record["rejected"][phase]
        assert set(rejected) == {"yibin (node 11)", "yibin (node 14)"}
        assert rejected["yibin (node 14)"].startswith("nodes 11, 14 all claim site 'yibin' this round")
    assert "yibin" not in record["sites"]
    assert record["nodes"] == {"yibin (node 11)": 11, "plagh": 12, "jinling": 13, "yibin (node 14)": 14}
    assert "train reply from yibin (node 14) rejected: nodes 11, 14 all claim site 'yibin'" in caplog.text
    lines = [json.loads(x) for x in strategy.folder.audit_path.read_text().splitlines()]
    screened = next(e for e in lines if e["direction"] == "screening" and e["type"] == "train")
    assert [(r["node"], r["name"], r["outcome"]) for r in screened["replies"]] == [
        (11, "yibin (node 11)", "rejected"), (12, "plagh", "kept"), (13, "jinling", "kept"),
        (14, "yibin (node 14)", "rejected")]


def test_an_update_above_the_bound_is_clipped_not_dropped(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy()
    result = run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0),
                                         13: site("jinling", 10, 500.0)}))
    # norms sqrt(3) x (1, 2, 500): the bound is 10 x the median, so jinling's +500 becomes +20
    np.testing.assert_allclose(result.arrays["w"].numpy(), (1.0 + 2.0 + 20.0) / 3, rtol=1e-6)
    record = strategy.history[0]
    assert record["rejected"] == {}
    assert record["clipped"] == {"jinling": {"w": {"norm": pytest.approx(500 * math.sqrt(3)),
                                                   "bound": pytest.approx(20 * math.sqrt(3))}}}
    assert record["sites"]["jinling"]["train"]["update_norm_clipped"] == pytest.approx(20 * math.sqrt(3), rel=1e-6)
    assert record["norm_bound"]["reference"] == "the lower median of this round's 3 replies"
    assert "train reply from jinling (node 13): update clipped onto robust.norm-factor 10 x" in caplog.text
    assert strategy.book.rounds[0].mlflow_metrics()["round/clipped_train"] == 1


@pytest.mark.parametrize("second_round, expected", [
    ({11: site("yibin", 10, 1.0), 13: site("mallory", 10, 500.0)}, 1.0 + (1.0 + 10.0) / 2),  # two replies
    ({13: site("mallory", 10, 500.0)}, 1.0 + 10.0),  # mallory alone
])
def test_the_bound_is_carried_to_rounds_with_one_or_two_replies(make_strategy, caplog, second_round, expected):
    """Round 1: three honest +1 updates. Round 2 has no median: the bound is 10 x the norms accepted in round 1, so
    mallory's +500 counts as +10."""
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(rounds=2)
    honest = {11: site("yibin", 10, 1.0), 12: site("plagh", 10, 1.0), 13: site("mallory", 10, 1.0)}
    grid = ScriptedGrid({node: by_round(answer, second_round.get(node)) for node, answer in honest.items()})
    result = run(strategy, grid, rounds=2)
    np.testing.assert_allclose(result.arrays["w"].numpy(), expected, rtol=1e-6)
    second = strategy.history[1]
    assert second["clipped"]["mallory"]["w"]["bound"] == pytest.approx(10 * math.sqrt(3))
    assert second["norm_bound"]["reference"].startswith("the lower median of the norms accepted over the last 1 "
                                                        "aggregated round(s)")


def test_round_one_with_two_replies_says_it_has_no_bound(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy()
    run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("plagh", 10, 2.0)}))
    assert "round 1: 2 train replies and no round aggregated before: no reference norm" in caplog.text
    assert strategy.history[0]["norm_bound"] == {}


def test_an_update_hidden_in_the_classifier_head_is_clipped_in_its_group(make_strategy):
    """Ten times the median and more in the small classifier head, normal elsewhere: the whole-model norm barely
    moves (35 against 32), the classifier group's is 500 x its median."""
    initial = {"encoder.w": torch.zeros(1000), "classifier.w": torch.zeros(10)}
    grid = ScriptedGrid({11: groups_site("yibin", 10, {"encoder": 1.0, "classifier": 0.01}),
                         12: groups_site("plagh", 10, {"encoder": 1.0, "classifier": 0.01}),
                         13: groups_site("mallory", 10, {"encoder": 1.0, "classifier": 5.0})})
    strategy = make_strategy()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1, timeout=5,
                            train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    np.testing.assert_allclose(result.arrays["encoder.w"].numpy(), 1.0, rtol=1e-6)
    # mallory's head update clipped from 5.0 to 10 x 0.01 per weight: (0.01 + 0.01 + 0.1) / 3
    np.testing.assert_allclose(result.arrays["classifier.w"].numpy(), 0.04, rtol=1e-5)
    assert set(strategy.history[0]["clipped"]) == {"mallory"}
    assert set(strategy.history[0]["clipped"]["mallory"]) == {"classifier"}


def test_a_median_of_two_replies_is_refused_and_the_model_stays(make_strategy, caplog):
    caplog.set_level(logging.INFO, logger="braintumnet.server")
    strategy = make_strategy(audit=True, run_config={"strategy.aggregation": "median"})
    run(strategy, ScriptedGrid({11: site("yibin", 10, 1.0), 12: site("mallory", 10, 9.0)}))
    np.testing.assert_allclose(strategy.arrays["w"].numpy(), 0.0)  # not their mean, 5.0
    reason = "strategy.aggregation median of 2 replies would be their plain unweighted mean (it needs 3 or more)"
    assert f"round 1: {reason}: the round's aggregate is refused, the global model stays as it was" in caplog.text
    record = strategy.history[0]
    assert record["skipped"] and record["refused"] == reason
    assert strategy.book.rounds[0].mlflow_metrics()["round/refused"] == 1.0
    lines = [json.loads(x) for x in strategy.folder.audit_path.read_text().splitlines()]
    assert next(e for e in lines if e["direction"] == "screening")["refused"] == reason


def test_an_update_whose_norm_is_not_finite_is_rejected(make_strategy):
    """Finite float64 weights whose difference overflows: the update cannot be measured or clipped."""
    initial = {"w": torch.full((3,), -1e308, dtype=torch.float64)}

    def huge(got):
        return ArrayRecord({"w": Array(np.full(3, 1e308))})

    strategy = make_strategy()
    strategy.start(grid=ScriptedGrid({11: site("mallory", 10, 0.0, arrays=huge)}),
                   initial_arrays=ArrayRecord(initial), num_rounds=1, timeout=5, train_config=ConfigRecord({}),
                   evaluate_config=ConfigRecord({}))
    np.testing.assert_allclose(strategy.arrays["w"].numpy(), -1e308)
    assert strategy.history[0]["rejected"]["train"] == {"mallory": "the update's norm is not finite"}
