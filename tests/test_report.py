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


@pytest.fixture
def drawn(monkeypatch):
    """Every Figure a plot function saves, kept for inspection (the PNG is still written)."""
    figures = []
    real_save = plots.save

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    return figures


def test_plots_use_constrained_layout_readable_labels_and_the_synthetic_mark(tmp_path, slices, drawn):
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    y, probs = np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 2, 1]]
    image, target, pred = slices
    plots.roc_curves(y, probs, CLASSES, tmp_path / "roc.png", synthetic=True)
    plots.confusion_matrix_plot([[1, 0], [0, 1]], CLASSES[:2], tmp_path / "cm.png", synthetic=True)
    plots.dice_distribution({"tumor": [0.5], "whole": [0.7]}, tmp_path / "dice.png", synthetic=True)
    plots.overlay_examples([image], [target], [pred], tmp_path / "overlay.png", synthetic=True)
    for fig in drawn:
        assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
        assert "SYNTHETIC" in fig.get_suptitle()
    assert drawn[0].axes[0].get_xlabel().startswith("False-positive rate")
    assert [t.get_text() for t in drawn[2].axes[0].get_xticklabels()] == ["tumour", "whole lesion"]
    drawn.clear()
    plots.roc_curves(y, probs, CLASSES, tmp_path / "roc.png")
    assert "SYNTHETIC" not in drawn[0].get_suptitle()  # real data: no mark
    assert plots.metric_label("dice_tumor") == "Tumour Dice" and plots.metric_label("acc") == "Accuracy"


def test_overlay_legend_names_only_what_was_predicted(tmp_path, slices, drawn):
    image, target, pred = slices
    empty = np.zeros_like(pred)

    def legend(preds):
        drawn.clear()
        plots.overlay_examples([image] * len(preds), [target] * len(preds), preds, tmp_path / "overlay.png")
        return [t.get_text() for t in drawn[0].legends[0].get_texts()]

    nothing = legend([empty, empty])
    assert not any("predicted" in label for label in nothing) and "the model segmented nothing" in " ".join(nothing)
    assert "tumour, reference" in nothing
    assert sum("predicted" in label for label in legend([pred, empty])) == 2  # tumour and whole lesion
    edema_only = np.where(target == 2, 2, 0).astype(np.uint8)  # no tumour label: only the whole-lesion contour
    assert [label for label in legend([edema_only]) if "predicted" in label] == ["tumour + edema, predicted"]


def test_git_commit_marks_a_dirty_tree_and_never_fails(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from braintumnet.report import provenance

    assert provenance.git_commit(tmp_path) == "unknown"  # not a checkout
    if shutil.which("git"):
        def git(*args):
            subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                           capture_output=True)

        git("init", "-q")
        (tmp_path / "a.txt").write_text("1")
        git("add", "a.txt")
        git("commit", "-q", "-m", "one")
        clean = provenance.git_commit(tmp_path)
        assert clean != "unknown" and not clean.endswith("-dirty")
        (tmp_path / "a.txt").write_text("2")
        assert provenance.git_commit(tmp_path) == f"{clean}-dirty"
        (tmp_path / "sub").mkdir()  # a folder inside some other checkout is not that checkout's code
        assert provenance.git_commit(tmp_path / "sub") == "unknown"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.git_commit(tmp_path) == "unknown"


def test_provenance_records_overrides_versions_and_machine():
    import braintumnet
    from braintumnet.report.provenance import one_line, provenance

    record = provenance({"model.gate-gradient": False, "num-server-rounds": 5})
    assert record["overrides"] == {"model.gate-gradient": False, "num-server-rounds": 5}
    assert record["braintumnet"] == braintumnet.__version__ and record["commit"]
    assert {"python", "torch", "flwr"} <= set(record) and all(record[k] for k in ("python", "torch", "flwr"))
    assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1 and "gpu" in record["machine"]
    line = one_line(record)
    assert "model.gate-gradient=false" in line and "num-server-rounds=5" in line and record["commit"] in line
