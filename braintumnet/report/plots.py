"""PNG figures of an evaluation or a prediction, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Each function takes arrays the caller already holds, writes one PNG and returns its path; ``synthetic=True`` puts a
red SYNTHETIC mark on the figure (a PNG travels without the report's banner). Axial slices are ``H×W``
arrays in the prepared slices' display order (``braintumnet.data.preprocess``): rows from anterior (top) to posterior,
columns from the patient's left to right, as nilearn draws them; they are shown as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from braintumnet.extras import require

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: a site's lean install may lack it (extras.py)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

# Contour colours: the whole lesion (labels 1 + 2, so its outline is the edema's outer border) and the tumour
# (label 1). Reference contours solid, predictions dashed. Filled overlays colour each label on its own.
REGION_COLOURS = {"whole": "#f4c20d", "tumour": "#e8302a"}
REGION_LABELS = {"whole": (1, 2), "tumour": (1,)}
LABEL_COLOURS = {1: REGION_COLOURS["tumour"], 2: REGION_COLOURS["whole"]}
REGION_NAMES = {"whole": "tumour + edema", "tumour": "tumour"}
REGION_AXIS = {"tumor": "tumour", "edema": "edema", "whole": "whole lesion"}
DPI = 110
SYNTHETIC_MARK = "SYNTHETIC DATA (phantom cohort, not patients)"
# Axis labels for metrics.json keys: a reader of a figure should not need the key names.
METRIC_LABELS = {
    "dice_tumor": "Tumour Dice", "dice_edema": "Edema Dice", "dice_whole": "Whole-lesion Dice",
    "iou_tumor": "Tumour IoU", "acc": "Accuracy", "auc": "AUC (macro)", "f1": "F1 (macro)",
    "sensitivity": "Sensitivity (macro)", "specificity": "Specificity (macro)", "train_loss": "Training loss",
}


def new_figure(**kwargs) -> Figure:
    """A matplotlib ``Figure(**kwargs)``, or a message naming the extra that installs matplotlib."""
    return require("matplotlib.figure", "drawing figures").Figure(**kwargs)


def _legend_line(**kwargs) -> Line2D:
    """An empty line that only shows in a legend."""
    return require("matplotlib.lines", "drawing figures").Line2D([], [], **kwargs)


def metric_label(key: str) -> str:
    """A readable name for a metric key (the key itself, tidied, when it has none)."""
    return METRIC_LABELS.get(key, key.replace("_", " "))


def mark_synthetic(fig: Figure, synthetic: bool) -> None:
    """The red SYNTHETIC line at the top of a figure drawn from phantom data (the figure's own suptitle)."""
    if synthetic:
        fig.suptitle(SYNTHETIC_MARK, color="#c00000", fontweight="bold", fontsize=9)


def roc_curves(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str], path: Path,
               title: str = "ROC, one-vs-rest (case level)", *, synthetic: bool = False) -> Path:
    """One ROC curve per class, one-vs-rest, from scikit-learn's ``roc_curve``.

    Args:
        y_true: (n,) true class indices.
        probs: (n, K) class probabilities.
        class_names: the K class names.
        path: the PNG to write.

    A class with no positive or no negative case has no curve; the legend says so.
    """
    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    fig = new_figure(figsize=(4.8, 4.6), layout="constrained")
    mark_synthetic(fig, synthetic)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    for k, name in enumerate(class_names):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc_auc_score(positives, probs[:, k]):.2f})")
        else:
            ax.plot([], [], lw=0, label=f"{name}: undefined ({int(positives.sum())} of {len(y_true)} cases)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False-positive rate (1 − specificity)",
           ylabel="True-positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix (case level)", *, synthetic: bool = False) -> Path:
    """Counts, rows = true class, columns = predicted class, each cell shaded by its share of the row."""
    matrix = np.asarray(matrix, dtype=int)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = new_figure(figsize=(2.4 + 1.1 * len(class_names), 1.6 + 1.0 * len(class_names)), layout="constrained")
    mark_synthetic(fig, synthetic)
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=30, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return save(fig, path)


def dice_distribution(dice: Mapping[str, Sequence[float]], path: Path,
                      title: str = "Dice per case", *, synthetic: bool = False) -> Path:
    """A box plot per region (``{"tumor": [...], "edema": [...], "whole": [...]}``) with every case as a dot."""
    names = [n for n, v in dice.items() if len(v)]
    values = [np.asarray(dice[n], dtype=float) for n in names]
    fig = new_figure(figsize=(2.4 + 1.2 * max(len(names), 1), 4.0), layout="constrained")
    mark_synthetic(fig, synthetic)
    ax = fig.add_subplot()
    if names:
        ax.boxplot(values, showfliers=False, widths=0.5)
        ax.set_xticks(range(1, len(names) + 1), [REGION_AXIS.get(n, n) for n in names])
        jitter = np.random.default_rng(0)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + jitter.uniform(-0.12, 0.12, v.size), v, s=10, alpha=0.6, color="#1f77b4", zorder=3)
    ax.set(ylim=(-0.02, 1.02), ylabel="Dice", title=f"{title} (n = {max((v.size for v in values), default=0)})")
    ax.grid(axis="y", color="0.9")
    return save(fig, path)


def overlay_examples(images: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None,
                     preds: Sequence[np.ndarray], path: Path, titles: Sequence[str] | None = None, *,
                     synthetic: bool = False) -> Path:
    """A row of slices, each with the reference (solid) and predicted (dashed) contours of the tumour and of the
    whole lesion (tumour + edema). The legend lists only the predicted regions that appear in some slice.

    Args:
        images: H×W slices (see the module docstring).
        targets: their reference label maps, or None (prediction only).
        preds: their predicted label maps.
        titles: one caption per slice.
    """
    n = len(images)
    fig = new_figure(figsize=(2.8 * max(n, 1), 3.6), layout="constrained")
    mark_synthetic(fig, synthetic)
    for i in range(n):
        ax = fig.add_subplot(1, max(n, 1), i + 1)
        show_slice(ax, images[i], None if targets is None else targets[i], preds[i])
        if titles:
            ax.set_title(titles[i], fontsize=8)
    handles = legend_handles(targets is not None, predicted_regions(preds))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 if n < 3 else 5), fontsize=7,
               frameon=False)
    return save(fig, path)


def case_report(path: Path, *, images: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                slice_titles: Sequence[str], heading: str, lines: Sequence[str],
                probabilities: Mapping[str, float], aspect: float = 1.0) -> Path:
    """The one-page report of ``braintumnet predict``: up to a few slices with the predicted mask, the class
    probabilities as a bar chart and the text ``lines`` (type, volumes, model, the not-for-clinical-use note).

    ``aspect`` is the pixel height over width (row spacing / column spacing) of the slices.
    """
    n = max(len(images), 1)
    fig = new_figure(figsize=(8.27, 9.5), layout="constrained")
    fig.suptitle(heading, fontsize=13)
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.5, 0.8, 1.0])
    axes = top.subplots(1, n, squeeze=False)[0]
    for ax, image, pred, title in zip(axes, images, preds, slice_titles):
        show_slice(ax, image, None, pred, filled=True, aspect=aspect)
        ax.set_title(title, fontsize=9)
    top.legend(handles=legend_handles(False, predicted_regions(preds)), loc="outside lower center", ncol=2,
               fontsize=8, frameon=False)
    ax = middle.subplots()
    names, values = list(probabilities), [float(v) for v in probabilities.values()]
    bars = ax.barh(names, values, color=["#d62728" if v == max(values) else "#1f77b4" for v in values])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set(xlim=(0, 1.1), xlabel="case-level probability", title="Tumour type")
    ax.invert_yaxis()
    ax = bottom.subplots()
    ax.axis("off")
    ax.text(0.0, 0.95, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes)
    return save(fig, path)


def show_slice(ax, image: np.ndarray, target: np.ndarray | None, pred: np.ndarray | None,
               filled: bool = False, aspect: float = 1.0) -> None:
    """Draw one H×W slice, its intensities windowed to the 1st-99.9th percentile, with the label contours."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image, (1, 99.9)) if image.size else (0.0, 1.0)
    ax.imshow(image, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), interpolation="nearest", aspect=aspect)
    for mask, style in ((target, "solid"), (pred, "dashed")):
        if mask is None:
            continue
        shown = np.asarray(mask)
        if filled:
            for label, colour in LABEL_COLOURS.items():
                if (shown == label).any():
                    ax.contourf((shown == label).astype(float), levels=[0.5, 1.5], colors=[colour], alpha=0.3)
        for region, labels in REGION_LABELS.items():
            inside = np.isin(shown, labels).astype(float)
            if inside.any():
                ax.contour(inside, levels=[0.5], colors=[REGION_COLOURS[region]], linewidths=1.2, linestyles=style)
    ax.set_xticks([])
    ax.set_yticks([])


def predicted_regions(preds: Sequence[np.ndarray | None]) -> set[str]:
    """The contour regions (``REGION_LABELS``) present in at least one of the label maps."""
    return {region for region, labels in REGION_LABELS.items()
            if any(p is not None and np.isin(np.asarray(p), labels).any() for p in preds)}


def legend_handles(with_reference: bool, predicted: set[str] | None = None) -> list[Line2D]:
    """Reference (solid) and predicted (dashed) entries per region; ``predicted`` limits the dashed ones to the
    regions a prediction shows (None: every region), so the legend never names a line the figure lacks."""
    handles = []
    for region, colour in REGION_COLOURS.items():
        if with_reference:
            handles.append(_legend_line(color=colour, ls="solid", label=f"{REGION_NAMES[region]}, reference"))
        if predicted is None or region in predicted:
            handles.append(_legend_line(color=colour, ls="dashed", label=f"{REGION_NAMES[region]}, predicted"))
    if predicted is not None and not predicted:
        handles.append(_legend_line(ls="none", label="the model segmented nothing in these slices"))
    return handles


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
