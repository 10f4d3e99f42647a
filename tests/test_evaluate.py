"""``braintumnet evaluate`` on the tiny phantom cohort: metrics.json with the canonical names, per-case table, plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from braintumnet.checkpoint import save_checkpoint
from braintumnet.data.contract import TASKS
from braintumnet.engine import build_model
from braintumnet.errors import BrainTumNetError
from braintumnet.evaluate import PLOTS, evaluate_checkpoint
from braintumnet.metrics import METRIC_NAMES


@pytest.fixture(scope="module")
def checkpoint(tiny_profile, prepared_sites, tmp_path_factory):
    """An untrained tiny model: evaluation must write every file whatever the model's quality.

    Depends on ``prepared_sites`` so the cache is already there: evaluate_checkpoint reuses it.
    """
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("evaluate") / "model.pt", build_model(tiny_profile).state_dict(),
                           tiny_profile, TASKS["3class"], {"synthetic": True})


def test_evaluate_writes_metrics_json_per_case_and_the_four_plots(checkpoint, phantom_root, cache_root, tmp_path):
    sites = [phantom_root / "yibin", phantom_root / "plagh"]
    report = evaluate_checkpoint(checkpoint, sites, tmp_path, cache_root=cache_root, split="test", progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written.keys() == report.keys()
    assert written["model"] == str(checkpoint) and written["synthetic"] is True
    assert list(written["metrics"])[: len(METRIC_NAMES)] == list(METRIC_NAMES)
    assert set(written["per_site"]) == {"yibin", "plagh"}
    for metrics in written["per_site"].values():
        assert set(METRIC_NAMES) <= set(metrics)
    n_cases = written["metrics"]["n_cases"]
    assert n_cases == sum(m["n_cases"] for m in written["per_site"].values())
    per_case = pd.read_csv(tmp_path / "per_case.csv")
    assert len(per_case) == n_cases and {"case_id", "dice_tumor", "prob_glioma"} <= set(per_case.columns)
    for name in PLOTS.values():
        assert (tmp_path / name).stat().st_size > 5_000, name


def test_evaluate_all_cases_of_one_site(checkpoint, phantom_root, cache_root, tmp_path):
    report = evaluate_checkpoint(checkpoint, [phantom_root / "external"], tmp_path, cache_root=cache_root, split=None,
                                 progress=False)
    assert report["split"] == "all" and list(report["per_site"]) == ["external"]
    assert report["metrics"]["n_cases"] == report["per_site"]["external"]["n_cases"] >= 1


def test_evaluate_bad_input(checkpoint, phantom_root, cache_root, tmp_path):
    with pytest.raises(BrainTumNetError, match="no such site folder"):
        evaluate_checkpoint(checkpoint, [tmp_path / "nowhere"], tmp_path / "out", cache_root=cache_root, progress=False)
    with pytest.raises(BrainTumNetError, match="no such checkpoint"):
        evaluate_checkpoint(tmp_path / "none.pt", [phantom_root / "yibin"], tmp_path / "out", cache_root=cache_root,
                            progress=False)
