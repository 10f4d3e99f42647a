"""The study's in-process arms trained by worker processes beside the federated arm (``--jobs``): the same arms with
the same scores as when the study trains them itself, for every fold, none counted as reused, and a worker that
fails leaves its arms to the study instead of losing them. The README's main job with workers beside the federated
arm, and each arm logged once to MLflow: tests/test_study.py."""

import json

import pytest
import torch

import simulation.study as study
from braintumnet.data.contract import SITES
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
    # arms itself, with as many torch threads as two workers get each, so that the sums below are the same sums.
    threads = max(1, workers.usable_cores() // 2)
    real = workers.override_items
    with monkeypatch.context() as patch:
        patch.setattr(study, "override_items", lambda o: [*real(o), "-c", "no.such-key=1"])
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            alone = study.run_study(tmp_path / "alone", "quick", **run)
        finally:
            torch.set_num_threads(before)
    said = capsys.readouterr().out
    for arm in IN_PROCESS:
        assert f"{arm} (seed 0, fold 1/2): its worker ended with exit code 2 without it" in said
    assert "reused" not in alone

    doc = study.run_study(tmp_path / "jobs", "quick", **run)

    assert _scores(doc) == _scores(alone) and doc["n_repetitions"] == 2  # both folds, every arm
    assert "reused" not in doc and "worker ended" not in capsys.readouterr().out
    assert doc["provenance"]["workers"] == {"processes": 2, "torch_threads": threads}
    logs = [p.name for p in (tmp_path / "jobs" / "workers").iterdir()]
    assert sorted(a for name in logs for a in name[:-len(".log")].split("+")) == sorted(
        a.replace(":", "-") for a in IN_PROCESS)
