"""``braintumnet evaluate``: score a checkpoint on site folders; write ``metrics.json``, ``per_case.csv`` and plots.

The model file describes itself (weights, config, class names), so the sites are prepared with the checkpoint's own
data settings and scored with the same ``engine.evaluate_cases`` every training arm uses (docs/metrics.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from braintumnet.checkpoint import load_model, task_of
from braintumnet.config import to_dict
from braintumnet.data.dataset import select_slices
from braintumnet.data.loading import default_cache_root, load_sites
from braintumnet.engine import pick_device
from braintumnet.scoring import evaluate_sites, most_tumour_slices
from braintumnet.errors import BrainTumNetError
from braintumnet.io import atomic_write_json
from braintumnet.postprocess import with_rule
from braintumnet.report import SYNTHETIC_NOTE, plots

log = logging.getLogger("braintumnet.evaluate")

PLOTS = {"roc": "roc.png", "confusion_matrix": "confusion_matrix.png", "dice_distribution": "dice_distribution.png",
         "overlay_examples": "overlay_examples.png"}
OVERLAY_CASES = 4  # by tumour Dice: the worst, the best and two evenly spaced between


def evaluate_checkpoint(
    model_path: Path,
    site_dirs: Sequence[Path],
    out: Path,
    *,
    cache_root: Path | None = None,
    split: str | None = "test",
    device: str = "auto",
    postprocess: str | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a checkpoint on the pooled sites and on each site; write the report files into ``out``.

    Args:
        model_path: the checkpoint.
        site_dirs: site folders; each is prepared (or its cache reused) with the checkpoint's data settings.
        out: the output folder (created).
        cache_root: prepared-slice cache root; default ``braintumnet.data.loading.default_cache_root()``.
        split: ``test``, ``train`` or None for every case.
        device: ``auto``, ``cpu`` or ``cuda``.
        postprocess: the post-processing rule (``braintumnet.postprocess``); None = the checkpoint's own
            ``model.postprocess``. ``config`` in ``metrics.json`` records the rule used.
        progress: progress bars.

    Returns:
        The ``metrics.json`` content: ``model``, ``synthetic``, ``split``, ``task``, ``class_names``, ``config``,
        ``metrics`` (pooled; the canonical ``braintumnet.metrics.METRIC_NAMES`` first), ``per_site``
        (site -> metrics), ``plots`` (name -> file name in ``out``) and ``note``.

    Raises:
        BrainTumNetError: a bad checkpoint or site folder, or no case of the split for the checkpoint's task.
    """
    if not site_dirs:
        raise BrainTumNetError("no site folder given: pass --data SITE_DIR[,SITE_DIR...]")
    out = Path(out).absolute()
    dev = pick_device(device)
    model, ckpt = load_model(model_path, dev)
    profile, classes = with_rule(ckpt.profile, postprocess), ckpt.class_names
    sites = load_sites([Path(d) for d in site_dirs], Path(cache_root or default_cache_root()), profile.data,
                       progress=progress)
    metrics, per_case, per_site = evaluate_sites(model, sites, split, profile, dev, progress=progress)
    synthetic = any(bool(s.meta.get("synthetic")) for s in sites)
    out.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(out / "per_case.csv", index=False)
    _write_plots(out, model, sites, split, classes, profile, metrics, per_case, dev)
    report = {
        "model": str(Path(model_path).absolute()),
        "synthetic": synthetic,
        "split": split or "all",
        "task": task_of(classes),
        "class_names": list(classes),
        "sites": [s.site for s in sites],
        "config": to_dict(profile),
        "metrics": metrics,
        "per_site": per_site,
        "plots": dict(PLOTS),
        "note": SYNTHETIC_NOTE if synthetic else "",
    }
    atomic_write_json(out / "metrics.json", report)
    log.info("evaluated %s on %d case(s): dice_tumor %.3f, acc %.3f; written to %s", model_path,
             metrics["n_cases"], metrics["dice_tumor"], metrics["acc"], out)
    return report


def _write_plots(out: Path, model, sites, split, classes, profile, metrics: dict, per_case: pd.DataFrame,
                 dev) -> None:
    """The four figures of an evaluation, from the per-case table and a few re-predicted slices."""
    y_true = per_case["label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    probs = per_case[[f"prob_{name}" for name in classes]].to_numpy(dtype=float)
    plots.roc_curves(y_true, probs, classes, out / PLOTS["roc"])
    plots.confusion_matrix_plot(metrics["confusion_matrix"], classes, out / PLOTS["confusion_matrix"])
    plots.dice_distribution({region: per_case[f"dice_{region}"].to_numpy(dtype=float)
                             for region in ("tumor", "edema", "whole") if f"dice_{region}" in per_case},
                            out / PLOTS["dice_distribution"])
    images, targets, preds, titles = _overlay_slices(model, sites, split, classes, profile, per_case, dev)
    plots.overlay_examples(images, targets, preds, out / PLOTS["overlay_examples"], titles)


def _overlay_slices(model, sites, split, classes, profile, per_case: pd.DataFrame, dev):
    """For ``OVERLAY_CASES`` cases spread over the tumour Dice ranking (worst to best): the case's slice with the
    most reference tumour, its reference and its prediction as it was scored (the whole case predicted and
    post-processed). Case ids are ``site/case_id`` (engine.evaluate_cases)."""
    ranked = per_case.sort_values("dice_tumor", kind="stable").reset_index(drop=True)
    picks = sorted({int(round(q * (len(ranked) - 1))) for q in np.linspace(0, 1, OVERLAY_CASES)})
    table = select_slices(sites, split, classes)
    table["key"] = table["site"] + "/" + table["case_id"]
    cases, shown = [], []
    for i in picks:
        key = str(ranked.loc[i, "case_id"])
        of_case = table[table["key"] == key]
        if not of_case.empty:
            cases.append(of_case)
            shown.append((key, float(ranked.loc[i, "dice_tumor"])))
    if not cases:
        return [], [], [], []
    chosen, preds, _ = most_tumour_slices(model, sites, cases, profile, dev)
    images = [np.asarray(sites[s].images[r], dtype=np.float32) for s, r in zip(chosen["site_index"], chosen["row"])]
    targets = [np.asarray(sites[s].masks[r]) for s, r in zip(chosen["site_index"], chosen["row"])]
    titles = [f"{key} z={int(z)}\nDice (case) {dice:.2f}" for (key, dice), z in zip(shown, chosen["z_index"])]
    return images, targets, list(preds), titles


__all__ = ["PLOTS", "evaluate_checkpoint"]
