"""``braintumnet.report``: the metrics table the commands print and the PNG figures."""

from __future__ import annotations

import numpy as np
import pytest

from braintumnet.metrics import METRIC_NAMES
from braintumnet.report import plots
from braintumnet.report.summary import find_metric_sets, format_metrics

CLASSES = ("glioma", "metastasis", "meningioma")


def metrics(value: float, n: int) -> dict:
    return {**{name: value for name in METRIC_NAMES}, "n_cases": n, "confusion_matrix": [[1, 0], [0, 1]]}


def test_table_has_every_canonical_metric_and_every_metrics_dict():
    report = {"arm": "centralized", "synthetic": True, "internal_test": metrics(0.812, 12),
              "external": metrics(0.7, 5), "per_site": {"yibin": metrics(0.9, 4), "plagh": metrics(0.8, 8)},
              "folds": [{"internal_test": metrics(0.1, 1)}]}
    table = format_metrics(report)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "internal_test", "external", "site:yibin", "site:plagh"]
    assert [line.split()[0] for line in lines[1:1 + len(METRIC_NAMES)]] == list(METRIC_NAMES)
    assert "0.812" in lines[1] and lines[len(METRIC_NAMES)].split()[1:] == ["12", "5", "4", "8"]
    assert "synthetic" in lines[-1]
    assert "confusion_matrix" not in table


def test_table_formats_mean_sd_nan_and_missing():
    report = {"cross_validation": {"dice_tumor": {"mean": 0.8, "sd": 0.05}, "hd95_tumor_mm": {"mean": 3.21, "sd": 1}},
              "internal_test": {"dice_tumor": float("nan"), "auc": 0.9}}
    table = format_metrics(report)
    assert "0.800±0.050" in table and "3.2±1.0" in table
    row = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert row["dice_tumor"][1] == "nan" and row["auc"] == ["-", "0.900"]


def test_a_bare_metrics_dict_and_an_empty_report():
    assert list(find_metric_sets(metrics(0.5, 3))) == ["metrics"]
    assert format_metrics({"arm": "x"}) == "(no metrics found)"


@pytest.fixture
def slices():
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    target = np.zeros((32, 32), np.uint8)
    target[8:24, 8:24], target[12:20, 12:20] = 2, 1
    return image, target, np.roll(target, 2, axis=1)


def test_each_plot_writes_a_png(tmp_path, slices):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probs = rng.dirichlet(np.ones(3), len(y))
    image, target, pred = slices
    written = [
        plots.roc_curves(y, probs, CLASSES, tmp_path / "roc.png"),
        plots.confusion_matrix_plot([[2, 1, 0], [0, 3, 0], [1, 0, 1]], CLASSES, tmp_path / "cm.png"),
        plots.dice_distribution({"tumor": rng.random(8), "edema": rng.random(8), "whole": rng.random(8)},
                                tmp_path / "dice.png"),
        plots.overlay_examples([image, image], [target, target], [pred, pred], tmp_path / "overlay.png", ["a", "b"]),
        plots.case_report(tmp_path / "report.png", images=[image], preds=[pred], slice_titles=["z=3"], heading="c1",
                          lines=["tumour type: glioma", "not for clinical use"],
                          probabilities=dict(zip(CLASSES, probs[0]))),
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_roc_with_a_class_absent_and_empty_inputs(tmp_path):
    """A class with no case has no curve (one-vs-rest is undefined); nothing to show still gives a figure."""
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    assert plots.roc_curves(y, probs, CLASSES, tmp_path / "roc.png").is_file()
    assert plots.dice_distribution({}, tmp_path / "dice.png").is_file()
    assert plots.overlay_examples([], [], [], tmp_path / "overlay.png").is_file()
