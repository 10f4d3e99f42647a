"""The study's in-process arms trained by worker processes beside the federated arm (``--jobs``): the same arms with
the same scores as when the study trains them itself, for every fold of a cross-validation (which this test covers:
mean and sd over folds), none counted as reused, and a worker that fails leaves its arms to the study instead of
losing them. The README's main job with workers beside the federated arm, and each arm logged once to MLflow:
tests/test_study.py."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import simulation.study as study
from braintumnet.data.contract import SITES
from braintumnet.metrics import METRIC_NAMES
from simulation import workers

IN_PROCESS = ["centralized", *(f"local:{s}" for s in SITES)]


def _scores(doc: dict) -> str:
    return json.dumps({arm: doc[arm] for arm in IN_PROCESS}, sort_keys=True)


@pytest.mark.timeout(900)
def test_workers_train_the_arms_the_study_would_and_a_failed_one_leaves_them_to_it(phantom_root, tiny_run_config,
                                                                                  tmp_path, monkeypatch, capsys):
    overrides = {k: v for k, v in tiny_run_config.items() if k != "profile"}
    overrides.update({"num-server-rounds": 1, "train.local-epochs": 2, "train.site-batch-size": 4})  # 2 epochs
    run = dict(phantom=phantom_root, device="cpu", overrides=overrides, skip_federated=True, folds=2, jobs=2)
    # First every worker fails at once (an unknown key reaches only their command lines): the study trains their
    # arms itself, with as many torch threads as each worker would have had, so that the sums below are the same.
    real = workers.override_items
    before = torch.get_num_threads()
    with monkeypatch.context() as patch:
        patch.setattr(study, "override_items", lambda o: [*real(o), "-c", "no.such-key=1"])
        alone = study.run_study(tmp_path / "alone", "quick", **run)
    assert torch.get_num_threads() == before  # given back after the study
    said = capsys.readouterr().out
    for arm in IN_PROCESS:
        assert f"{arm} (seed 0, fold 1/2): its worker ended with exit code 2 without it" in said
    assert "reused" not in alone

    doc = study.run_study(tmp_path / "jobs", "quick", **run)

    assert _scores(doc) == _scores(alone)
    # Cross-validation: every arm once per fold (each site holding out its own fold k), mean and sd over the folds,
    # each fold's held-out cases scored.
    assert doc["n_repetitions"] == 2 and [r["fold"] for r in doc["repetitions"]] == [0, 1]
    for arm in ("centralized", "local:jinling"):
        values = [r[arm]["internal_test"]["dice_tumor"] for r in doc["repetitions"]]
        assert doc[arm]["internal_test"]["dice_tumor"] == pytest.approx(sum(values) / 2)
        assert doc["sd"][arm]["internal_test"]["dice_tumor"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert set(METRIC_NAMES) - {"auc"} <= set(doc[arm]["validation"])
    report = (tmp_path / "jobs" / "report.md").read_text()
    assert "±" in report and "Cross-validation" in report and "fold 2/2" in report
    said = capsys.readouterr().out
    assert "reused" not in doc and "worker ended" not in said
    # Each arm of each fold trained once: by a worker, or here while the study waited (claimed before training).
    here = re.findall(r"^\[[\d:]+\]   (\S+) \((seed 0, fold \d/2)\): trained here while the workers", said, re.M)
    by_workers = [m for p in (tmp_path / "jobs" / "workers").glob("worker-*.log")
                  for m in re.findall(r"^\[[\d:]+\]   (\S+) \((seed 0, fold \d/2)\): internal", p.read_text(), re.M)]
    assert sorted(here + by_workers) == sorted((arm, f"seed 0, fold {k}/2") for arm in IN_PROCESS for k in (1, 2))
    assert doc["provenance"]["workers"] == {"processes": 2, "torch_threads": max(1, workers.usable_cores() // 2)}
    logs = [p.read_text().splitlines()[0] for p in sorted((tmp_path / "jobs" / "workers").glob("worker-*.log"))]
    assert sorted(a for line in logs for a in line.split(": ")[1].split(", ")) == sorted(IN_PROCESS)


def test_an_arm_is_claimed_once_and_a_worker_is_up_once_it_has_claimed_one(tmp_path):
    """The claims that keep the study and its workers from training an arm twice (the study takes an arm a worker
    has not started only from a worker that is up)."""
    this = SimpleNamespace(pid=os.getpid())  # a claim names its claimant's pid
    pool = workers.Workers(tmp_path, {}, [workers.Worker(["centralized", "local:yibin"], this, tmp_path / "w-1.log")])
    assert not pool.started("local:yibin") and not pool.started("local:plagh")
    assert workers.claim(tmp_path, 0, None, "centralized")
    assert pool.started("local:yibin") and not pool.started("local:plagh")  # plagh: no worker holds it
    assert not workers.claim(tmp_path, 0, None, "centralized")
    assert workers.claim(tmp_path, 0, 1, "centralized") and workers.claim(tmp_path, 1, None, "centralized")
