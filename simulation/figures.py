"""The study report's figures (PNG, matplotlib object API): learning curves per round, ROC curves, confusion
matrices and per-site bars (the example overlays are ``braintumnet.report.plots.overlay_examples``). Each takes what
the study already holds and returns the paths it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sklearn.metrics import confusion_matrix

from braintumnet.report.plots import _save, confusion_matrix_plot, roc_curves


def learning_curves(rounds: Sequence[Mapping], finals: Mapping[str, Mapping], path: Path) -> Path:
    """Federated internal (sites' test splits, case-weighted) and external Dice and accuracy after every round, with
    the other arms' final values as dashed lines (they have no rounds).

    Args:
        rounds: the server's ``metrics.json`` ``rounds`` (``evaluate``, ``external``, ``train`` per round).
        finals: arm -> its ``internal_test`` metrics.
    """
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 3)
    x = [r["round"] for r in rounds]
    for ax, metric in zip(axes[:2], ("dice_tumor", "acc")):
        ax.plot(x, [r.get("evaluate", {}).get(metric, np.nan) for r in rounds], "o-", label="federated, internal")
        ext = [(r.get("external") or {}).get(metric, np.nan) for r in rounds]
        if np.isfinite(ext).any():
            ax.plot(x, ext, "s--", label="federated, external")
        for i, (arm, values) in enumerate(finals.items()):
            if arm != "federated" and metric in values:
                ax.axhline(values[metric], ls=":", lw=1.2, color=f"C{i + 2}", label=f"{arm} (final)")
        ax.set(xlabel="round", ylabel=metric, ylim=(-0.02, 1.02), title=metric)
        ax.grid(color="0.92")
    axes[2].plot(x, [r.get("train", {}).get("train_loss", np.nan) for r in rounds], "o-", color="C3")
    axes[2].set(xlabel="round", ylabel="loss", title="federated train loss (site mean)")
    axes[2].grid(color="0.92")
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def site_bars(results: Mapping[str, Mapping], sites: Sequence[str], path: Path) -> Path:
    """Dice (tumour) and accuracy of every arm on every site's test split, grouped by site."""
    arms = list(results)
    fig = Figure(figsize=(4 + 1.2 * len(sites) * max(len(arms), 1) / 3, 3.4))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(arms), 1)
    for ax, metric in zip(axes, ("dice_tumor", "acc")):
        for i, arm in enumerate(arms):
            values = [results[arm]["per_site"].get(s, {}).get(metric, np.nan) for s in sites]
            ax.bar(np.arange(len(sites)) + i * width, values, width, label=arm)
        ax.set_xticks(np.arange(len(sites)) + width * (len(arms) - 1) / 2, sites)
        ax.set(ylim=(0, 1.02), ylabel=metric, title=f"{metric} per test site")
        ax.grid(axis="y", color="0.92")
    axes[1].legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.45, 1.0))
    return _save(fig, path)


def classification_figures(cases: pd.DataFrame, classes: Sequence[str], folder: Path, stem: str,
                           label: str) -> list[Path]:
    """ROC curves and the confusion matrix of one arm on one test set, from its per-case probabilities."""
    probs = cases[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    y = cases["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    matrix = confusion_matrix(y, probs.argmax(1), labels=range(len(classes)))
    return [roc_curves(y, probs, classes, folder / f"roc_{stem}.png", title=f"ROC, {label}"),
            confusion_matrix_plot(matrix, classes, folder / f"confusion_{stem}.png", title=f"Confusion, {label}")]
