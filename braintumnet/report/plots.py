"""PNG figures of an evaluation or a prediction, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Each function takes arrays the caller already holds, writes one PNG and returns its path. Axial slices are ``H×W``
arrays in the prepared slices' display order (``braintumnet.data.preprocess``): rows from anterior (top) to posterior,
columns from the patient's left to right, as nilearn draws them; they are shown as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_auc_score, roc_curve

# Contour colours: the whole lesion (labels 1 + 2, so its outline is the edema's outer border) and the tumour
# (label 1). Reference contours solid, predictions dashed. Filled overlays colour each label on its own.
REGION_COLOURS = {"whole": "#f4c20d", "tumour": "#e8302a"}
REGION_LABELS = {"whole": (1, 2), "tumour": (1,)}
LABEL_COLOURS = {1: REGION_COLOURS["tumour"], 2: REGION_COLOURS["whole"]}
REGION_NAMES = {"whole": "tumour + edema", "tumour": "tumour"}
DPI = 110


def roc_curves(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str], path: Path,
               title: str = "ROC, one-vs-rest (case level)") -> Path:
    """One ROC curve per class, one-vs-rest, from scikit-learn's ``roc_curve``.

    Args:
        y_true: (n,) true class indices.
        probs: (n, K) class probabilities.
        class_names: the K class names.
        path: the PNG to write.

    A class with no positive or no negative case has no curve; the legend says so.
    """
    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    for k, name in enumerate(class_names):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc_auc_score(positives, probs[:, k]):.2f})")
        else:
            ax.plot([], [], lw=0, label=f"{name}: undefined ({int(positives.sum())} of {len(y_true)} cases)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix (case level)") -> Path:
    """Counts, rows = true class, columns = predicted class, each cell shaded by its share of the row."""
    matrix = np.asarray(matrix, dtype=int)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.4 + 1.1 * len(class_names), 1.1 + 1.0 * len(class_names)))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=30, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def dice_distribution(dice: Mapping[str, Sequence[float]], path: Path,
                      title: str = "Dice per case") -> Path:
    """A box plot per region (``{"tumor": [...], "edema": [...], "whole": [...]}``) with every case as a dot."""
    names = [n for n, v in dice.items() if len(v)]
    values = [np.asarray(dice[n], dtype=float) for n in names]
    fig = Figure(figsize=(1.6 + 1.2 * max(len(names), 1), 3.8))
    ax = fig.add_subplot()
    if names:
        ax.boxplot(values, showfliers=False, widths=0.5)
        ax.set_xticks(range(1, len(names) + 1), names)
        jitter = np.random.default_rng(0)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + jitter.uniform(-0.12, 0.12, v.size), v, s=10, alpha=0.6, color="#1f77b4", zorder=3)
    ax.set(ylim=(-0.02, 1.02), ylabel="Dice", title=f"{title} (n = {max((v.size for v in values), default=0)})")
    ax.grid(axis="y", color="0.9")
    return _save(fig, path)


def overlay_examples(images: Sequence[np.ndarray], targets: Sequence[np.ndarray] | None,
                     preds: Sequence[np.ndarray], path: Path, titles: Sequence[str] | None = None) -> Path:
    """A row of slices, each with the reference (solid) and predicted (dashed) contours of the tumour and of the
    whole lesion (tumour + edema).

    Args:
        images: H×W slices (see the module docstring).
        targets: their reference label maps, or None (prediction only).
        preds: their predicted label maps.
        titles: one caption per slice.
    """
    n = len(images)
    fig = Figure(figsize=(2.8 * max(n, 1), 3.3))
    for i in range(n):
        ax = fig.add_subplot(1, max(n, 1), i + 1)
        show_slice(ax, images[i], None if targets is None else targets[i], preds[i])
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.legend(handles=legend_handles(targets is not None), loc="lower center", ncol=2 if n < 3 else 4, fontsize=7,
               frameon=False)
    fig.subplots_adjust(bottom=0.2 if n < 3 else 0.12)
    return _save(fig, path)


def case_report(path: Path, *, images: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                slice_titles: Sequence[str], heading: str, lines: Sequence[str],
                probabilities: Mapping[str, float], aspect: float = 1.0) -> Path:
    """The one-page report of ``braintumnet predict``: up to a few slices with the predicted mask, the class
    probabilities as a bar chart and the text ``lines`` (type, volumes, model, the not-for-clinical-use note).

    ``aspect`` is the pixel height over width (row spacing / column spacing) of the slices.
    """
    n = max(len(images), 1)
    fig = Figure(figsize=(8.27, 9.5))
    fig.suptitle(heading, fontsize=13)
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.5, 0.8, 1.0])
    axes = top.subplots(1, n, squeeze=False)[0]
    for ax, image, pred, title in zip(axes, images, preds, slice_titles):
        show_slice(ax, image, None, pred, filled=True, aspect=aspect)
        ax.set_title(title, fontsize=9)
    top.legend(handles=legend_handles(False), loc="lower center", ncol=2, fontsize=8, frameon=False)
    ax = middle.subplots()
    names, values = list(probabilities), [float(v) for v in probabilities.values()]
    bars = ax.barh(names, values, color=["#d62728" if v == max(values) else "#1f77b4" for v in values])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set(xlim=(0, 1.1), xlabel="case-level probability", title="Tumour type")
    ax.invert_yaxis()
    ax = bottom.subplots()
    ax.axis("off")
    ax.text(0.0, 0.95, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes)
    return _save(fig, path)


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


def legend_handles(with_reference: bool) -> list[Line2D]:
    handles = []
    for region, colour in REGION_COLOURS.items():
        if with_reference:
            handles.append(Line2D([], [], color=colour, ls="solid", label=f"{REGION_NAMES[region]}, reference"))
        handles.append(Line2D([], [], color=colour, ls="dashed", label=f"{REGION_NAMES[region]}, predicted"))
    return handles


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
