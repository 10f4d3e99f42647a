"""``braintumnet evaluate``: score a checkpoint on site folders; write ``metrics.json``, ``per_case.csv`` and plots.

The model file describes itself (weights, config, class names), so the sites are prepared with the checkpoint's own
data settings and scored with the same ``engine.evaluate_cases`` every training arm uses (docs/metrics.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from braintumnet.checkpoint import Checkpoint, load_checkpoint
from braintumnet.config import to_dict
from braintumnet.data.contract import TASKS
from braintumnet.data.dataset import select_slices
from braintumnet.data.loading import default_cache_root, load_sites
from braintumnet.engine import build_model, evaluate_sites, pick_device, predict_slices
from braintumnet.errors import BrainTumNetError
from braintumnet.report import plots

log = logging.getLogger("braintumnet.evaluate")

SYNTHETIC_NOTE = ("Computed on synthetic (phantom) data: these figures show that the pipeline works, not how the "
                  "model does on patients.")
PLOTS = {"roc": "roc.png", "confusion_matrix": "confusion_matrix.png", "dice_distribution": "dice_distribution.png",
         "overlay_examples": "overlay_examples.png"}
OVERLAY_CASES = 4  # by tumour Dice: the worst, the best and two evenly spaced between


def task_of(class_names: Sequence[str]) -> str | None:
    """The task (``3class`` / ``binary``) whose classes are ``class_names``, in order; None if none is."""
    return next((task for task, names in TASKS.items() if tuple(names) == tuple(class_names)), None)


def load_model(model_path: Path, device: torch.device, *,
               task: str | None = None) -> tuple[torch.nn.Module, Checkpoint]:
    """A checkpoint's BrainTumNet, weights loaded, in eval mode on ``device``.

    Args:
        model_path: a file written by ``save_checkpoint``.
        device: where the model runs.
        task: the task the caller expects (``3class`` or ``binary``); None accepts the checkpoint's own.

    Raises:
        BrainTumNetError: missing, corrupt or non-BrainTumNet file; a checkpoint of another task than ``task``;
            weights that do not fit the model its config describes (naming the two tasks when that is the cause).
    """
    ckpt = load_checkpoint(model_path)
    names = ckpt.class_names
    own_task = task_of(names)
    if task is not None and task not in TASKS:
        raise BrainTumNetError(f"task {task!r} is not known: use one of {sorted(TASKS)}")
    if task is not None and own_task != task:
        raise BrainTumNetError(
            f"{model_path}: this checkpoint was trained for the {own_task or 'unknown'} task "
            f"({len(names)} classes: {', '.join(names)}), not {task} ({', '.join(TASKS[task])}); "
            f"use a {task} model, or leave the task out to use this one")
    model = build_model(ckpt.profile, len(names))
    mismatch = _shape_mismatch(model.state_dict(), ckpt.state_dict)
    if mismatch:
        fits = [t for t, classes in TASKS.items() if not _shape_mismatch(
            build_model(ckpt.profile, len(classes)).state_dict(), ckpt.state_dict)]
        if fits:
            raise BrainTumNetError(
                f"{model_path}: the weights are for the {fits[0]} task ({', '.join(TASKS[fits[0]])}) but the "
                f"checkpoint names the classes of {_task_words(own_task)} ({', '.join(names)}); the file mixes two "
                "models: use a checkpoint written as a whole by braintumnet train or the federation server")
        raise BrainTumNetError(
            f"{model_path}: its weights do not fit the model its config describes ({mismatch}); it was written "
            "by another version of BrainTumNet or edited: use a checkpoint written by this version")
    model.load_state_dict(ckpt.state_dict)
    return model.to(device).eval(), ckpt


def _task_words(task: str | None) -> str:
    return f"the {task} task" if task else "no known task"


def _shape_mismatch(expected: dict, given: dict) -> str | None:
    """None if ``given`` has exactly ``expected``'s keys and shapes, else the first difference, in words."""
    missing = [k for k in expected if k not in given]
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    extra = [k for k in given if k not in expected]
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            return f"{key} is {tuple(given[key].shape)}, expected {tuple(tensor.shape)}"
    return None


def evaluate_checkpoint(
    model_path: Path,
    site_dirs: Sequence[Path],
    out: Path,
    *,
    cache_root: Path | None = None,
    split: str | None = "test",
    device: str = "auto",
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
    profile, classes = ckpt.profile, ckpt.class_names
    sites = load_sites([Path(d) for d in site_dirs], Path(cache_root or default_cache_root()), profile.data,
                       progress=progress)
    metrics, per_case, per_site = evaluate_sites(model, sites, split, profile, dev, progress=progress)
    synthetic = any(bool(s.meta.get("synthetic")) for s in sites)
    out.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(out / "per_case.csv", index=False)
    _write_plots(out, model, sites, split, classes, metrics, per_case, dev)
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
    (out / "metrics.json").write_text(json.dumps(_jsonable(report), indent=2))
    log.info("evaluated %s on %d case(s): dice_tumor %.3f, acc %.3f; written to %s", model_path,
             metrics["n_cases"], metrics["dice_tumor"], metrics["acc"], out)
    return report


def _write_plots(out: Path, model, sites, split, classes, metrics: dict, per_case: pd.DataFrame, dev) -> None:
    """The four figures of an evaluation, from the per-case table and a few re-predicted slices."""
    y_true = per_case["label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    probs = per_case[[f"prob_{name}" for name in classes]].to_numpy(dtype=float)
    plots.roc_curves(y_true, probs, classes, out / PLOTS["roc"])
    plots.confusion_matrix_plot(metrics["confusion_matrix"], classes, out / PLOTS["confusion_matrix"])
    plots.dice_distribution({region: per_case[f"dice_{region}"].to_numpy(dtype=float)
                             for region in ("tumor", "edema", "whole") if f"dice_{region}" in per_case},
                            out / PLOTS["dice_distribution"])
    images, targets, preds, titles = _overlay_slices(model, sites, split, classes, per_case, dev)
    plots.overlay_examples(images, targets, preds, out / PLOTS["overlay_examples"], titles)


def _overlay_slices(model, sites, split, classes, per_case: pd.DataFrame, dev):
    """For ``OVERLAY_CASES`` cases spread over the tumour Dice ranking (worst to best): the case's slice with the
    most reference tumour, its reference and its prediction. Case ids are ``site/case_id`` (engine.evaluate_cases)."""
    ranked = per_case.sort_values("dice_tumor", kind="stable").reset_index(drop=True)
    picks = sorted({int(round(q * (len(ranked) - 1))) for q in np.linspace(0, 1, OVERLAY_CASES)})
    table = select_slices(sites, split, classes)
    table["key"] = table["site"] + "/" + table["case_id"]
    rows = []
    for i in picks:
        key = str(ranked.loc[i, "case_id"])
        of_case = table[table["key"] == key]
        if of_case.empty:
            continue
        area = [int((sites[s].masks[r] == 1).sum()) for s, r in zip(of_case["site_index"], of_case["row"])]
        rows.append((of_case.iloc[[int(np.argmax(area))]], key, float(ranked.loc[i, "dice_tumor"])))
    if not rows:
        return [], [], [], []
    chosen = pd.concat([r[0] for r in rows], ignore_index=True)
    preds, _ = predict_slices(model, sites, chosen, dev, progress=False)
    images = [np.asarray(sites[s].images[r], dtype=np.float32) for s, r in zip(chosen["site_index"], chosen["row"])]
    targets = [np.asarray(sites[s].masks[r]) for s, r in zip(chosen["site_index"], chosen["row"])]
    titles = [f"{key} z={int(z)}\nDice (case) {dice:.2f}" for (_, key, dice), z in zip(rows, chosen["z_index"])]
    return images, targets, list(preds), titles


def _jsonable(value):
    """numpy scalars and arrays -> Python numbers and lists (NaN kept, as every metrics.json here writes it)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


__all__ = ["PLOTS", "evaluate_checkpoint", "load_model", "task_of"]
