"""The study report's figures (PNG, matplotlib object API): learning curves per round, ROC curves, confusion
matrices and per-site bars (the example overlays are ``braintumnet.report.plots.overlay_examples``). Each takes what
the study already holds and returns the paths it wrote. Every figure is laid out by matplotlib's constrained layout,
labels its axes in words rather than metrics.json keys, and carries the SYNTHETIC mark when ``synthetic``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sklearn.metrics import confusion_matrix

from braintumnet.report.plots import confusion_matrix_plot, mark_synthetic, metric_label, roc_curves, save

GRID = "0.92"


def learning_curves(rounds: Sequence[Mapping], finals: Mapping[str, Mapping], path: Path, *,
                    sd: Mapping[str, Mapping] | None = None, synthetic: bool = False) -> Path:
    """Federated internal (sites' test splits, case-weighted) and external Dice and accuracy after every round, with
    the other arms' final values as dotted lines (they have no rounds).

    Args:
        rounds: the server's ``metrics.json`` ``rounds`` (``evaluate``, ``external``, ``train`` per round).
        finals: arm -> its ``internal_test`` metrics.
        sd: arm -> the sd of those metrics over the repetitions; given (several seeds or folds), each final line
            carries a ±1 sd band. The rounds are the first repetition's.
    """
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    mark_synthetic(fig, synthetic)
    axes = fig.subplots(1, 3)
    x = [r["round"] for r in rounds]
    for ax, metric in zip(axes[:2], ("dice_tumor", "acc")):
        ax.plot(x, [r.get("evaluate", {}).get(metric, np.nan) for r in rounds], "o-", label="federated, internal")
        ext = [(r.get("external") or {}).get(metric, np.nan) for r in rounds]
        if np.isfinite(ext).any():
            ax.plot(x, ext, "s--", label="federated, external")
        for i, (arm, values) in enumerate(finals.items()):
            if arm != "federated" and metric in values:
                colour = f"C{i + 2}"
                ax.axhline(values[metric], ls=":", lw=1.2, color=colour, label=f"{arm} (final)")
                spread = (sd or {}).get(arm, {}).get(metric)
                if spread is not None and np.isfinite(spread) and spread > 0:
                    ax.axhspan(values[metric] - spread, values[metric] + spread, color=colour, alpha=0.12, lw=0)
        ax.set(xlabel="Federated round", ylabel=metric_label(metric), ylim=(-0.02, 1.02),
               title=f"{metric_label(metric)}, pooled internal test")
        ax.grid(color=GRID)
    axes[2].plot(x, [r.get("train", {}).get("train_loss", np.nan) for r in rounds], "o-", color="C3")
    axes[2].set(xlabel="Federated round", ylabel=metric_label("train_loss"),
                title="Federated training loss (site mean)")
    axes[2].grid(color=GRID)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    axes[0].legend(fontsize=7, loc="best")
    return save(fig, path)


def site_bars(results: Mapping[str, Mapping], sites: Sequence[str], path: Path, *,
              sd: Mapping[str, Mapping] | None = None, synthetic: bool = False) -> Path:
    """Tumour Dice and accuracy of every arm on every site's test split, grouped by site.

    ``sd``: arm -> its sd document (``per_site`` inside); given (several seeds or folds), each bar gets a ±1 sd
    error bar.
    """
    arms = list(results)
    fig = Figure(figsize=(5 + 1.4 * len(sites) * max(len(arms), 1) / 3, 4.0), layout="constrained")
    mark_synthetic(fig, synthetic)
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(arms), 1)
    for ax, metric in zip(axes, ("dice_tumor", "acc")):
        for i, arm in enumerate(arms):
            values = [results[arm]["per_site"].get(s, {}).get(metric, np.nan) for s in sites]
            errors = None
            if sd is not None:
                errors = [(sd.get(arm, {}).get("per_site", {}).get(s, {})).get(metric, np.nan) for s in sites]
            ax.bar(np.arange(len(sites)) + i * width, values, width, yerr=errors, capsize=2 if errors else 0,
                   error_kw={"lw": 0.8}, label=arm)
        ax.set_xticks(np.arange(len(sites)) + width * (len(arms) - 1) / 2, sites)
        ax.set(ylim=(0, 1.1 if sd is not None else 1.02), xlabel="Test site", ylabel=metric_label(metric),
               title=f"{metric_label(metric)} per test site" + (" (mean ± sd)" if sd is not None else ""))
        ax.grid(axis="y", color=GRID)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, title="model",
               title_fontsize=7)
    return save(fig, path)


def classification_figures(cases: pd.DataFrame, classes: Sequence[str], folder: Path, stem: str,
                           label: str, *, synthetic: bool = False) -> list[Path]:
    """ROC curves and the confusion matrix of one arm on one test set, from its per-case probabilities."""
    probs = cases[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    y = cases["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    matrix = confusion_matrix(y, probs.argmax(1), labels=range(len(classes)))
    return [roc_curves(y, probs, classes, folder / f"roc_{stem}.png", title=f"ROC, {label}", synthetic=synthetic),
            confusion_matrix_plot(matrix, classes, folder / f"confusion_{stem}.png", title=f"Confusion, {label}",
                                  synthetic=synthetic)]
