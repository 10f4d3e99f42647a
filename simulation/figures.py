"""The study report's figures (PNG, matplotlib object API): learning curves per round, ROC curves, confusion
matrices, per-site bars and example overlays (``braintumnet.report.plots.overlay_examples``), all chosen and drawn
by :func:`study_figures`. Each takes what the study already holds and returns the paths it wrote. Every figure is
laid out by matplotlib's constrained layout, labels its axes in words rather than metrics.json keys, and carries the
SYNTHETIC mark when ``synthetic``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from braintumnet.data.dataset import select_slices
from braintumnet.extras import require
from braintumnet.report.plots import (confusion_matrix_plot, mark_synthetic, metric_label, new_figure,
                                      overlay_examples, roc_curves, save)
from braintumnet.scoring import most_tumour_slices
from simulation.report import arms_of

GRID = "0.92"


def study_figures(out: Path, doc: dict, cases_of: dict, rounds: list, model, internal, profile, dev,
                  classes) -> list[dict]:
    """Every figure of the study report, written under ``out/figures``; returns ``[{"title", "path"}]`` (paths
    relative to ``out``), the ``figures`` of ``metrics.json``.

    Args:
        doc: ``metrics.json`` so far (the arms' means and sds).
        cases_of: arm -> test set -> per-case table of the first repetition.
        rounds: the first federated run's rounds (none: no learning curves).
        model: the model whose predictions the overlays show (None: no overlays).
    """
    folder = out / "figures"
    shown: list[tuple[Path, str]] = []
    arms = arms_of(doc)  # the study's arms; Table 2's gate-region arms are only in its table
    synthetic = bool(doc.get("synthetic"))
    several = doc.get("n_repetitions", 1) > 1  # error bars only where there is a spread to show
    if rounds:
        shown.append((learning_curves(rounds, {a: doc[a]["internal_test"] for a in arms},
                                      folder / "learning_curves.png",
                                      sd={a: doc["sd"][a]["internal_test"] for a in arms} if several else None,
                                      synthetic=synthetic),
                      "Learning curves: federated Dice and accuracy per round (internal and external); other arms' "
                      "finals" + (" (mean, band ±1 sd over the repetitions; rounds of the first)" if several else "")))
    shown.append((site_bars({a: doc[a] for a in arms}, doc["sites"]["internal"], folder / "per_site.png",
                            sd={a: doc["sd"][a] for a in arms} if several else None, synthetic=synthetic),
                  "Every arm on every site's test split" + (" (mean ± sd over the repetitions)" if several else "")))
    for arm in [a for a in ("federated", "centralized") if a in cases_of]:
        for section, label in (("internal_test", "pooled internal test"), ("external", "external site")):
            if section in cases_of[arm]:
                roc, confusion = classification_figures(cases_of[arm][section], classes, folder, f"{arm}_{section}",
                                                        f"{arm}, {label}", synthetic=synthetic)
                shown += [(roc, f"ROC curves, {arm}, {label} (first repetition)"),
                          (confusion, f"Confusion matrix, {arm}, {label} (first repetition)")]
    if model is not None:
        name = "federated" if "federated" in cases_of else "centralized"
        shown.append((example_overlays(model, internal, profile, dev, classes, folder / "overlays.png", synthetic),
                      f"Example internal test slices, {name} model: reference solid, prediction dashed"))
    return [{"title": title, "path": str(path.relative_to(out))} for path, title in shown]


def example_overlays(model, internal, profile, dev, classes, path: Path, synthetic: bool) -> Path:
    """One internal test slice per tumour type with the model's prediction over the reference, as it was scored (the
    whole case predicted and post-processed): the slice with the most reference tumour in the first test case of
    each type (test cases hold the whole scan, most of it tumour-free; a figure may pick by the labels, scoring
    never does)."""
    table = select_slices(internal, "test", classes)
    cases = [grp[(grp["site"] == grp["site"].iloc[0]) & (grp["case_id"] == grp["case_id"].iloc[0])]
             for _, grp in table.groupby("tumor_type", sort=True)]
    rows, seg, probs = most_tumour_slices(model, internal, cases, profile, dev)
    images = [internal[i].images[r].astype(np.float32) for i, r in zip(rows["site_index"], rows["row"])]
    targets = [internal[i].masks[r] for i, r in zip(rows["site_index"], rows["row"])]
    titles = [f"{t}: predicted {classes[int(p.argmax())]}" for t, p in zip(rows["tumor_type"], probs)]
    return overlay_examples(images, targets, list(seg), path, titles, synthetic=synthetic)


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
    fig = new_figure(figsize=(11, 3.8), layout="constrained")
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
    whole_numbers = require("matplotlib.ticker", "the study's figures").MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(whole_numbers(integer=True))  # rounds are whole numbers
    axes[0].legend(fontsize=7, loc="best")
    return save(fig, path)


def site_bars(results: Mapping[str, Mapping], sites: Sequence[str], path: Path, *,
              sd: Mapping[str, Mapping] | None = None, synthetic: bool = False) -> Path:
    """Tumour Dice and accuracy of every arm on every site's test split, grouped by site.

    ``sd``: arm -> its sd document (``per_site`` inside); given (several seeds or folds), each bar gets a ±1 sd
    error bar.
    """
    arms = list(results)
    fig = new_figure(figsize=(5 + 1.4 * len(sites) * max(len(arms), 1) / 3, 4.0), layout="constrained")
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
