"""Centralized training on the pooled sites (the paper's setting), with optional five-fold cross-validation.

``braintumnet train`` is a thin wrapper over ``train_centralized``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from braintumnet.checkpoint import load_model, save_checkpoint
from braintumnet.config import Profile, to_dict
from braintumnet.data.cache import PreparedSite
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.dataset import select_slices
from braintumnet.data.folds import case_folds
from braintumnet.engine import build_model, pick_device, train_model
from braintumnet.scoring import aggregate_metrics, evaluate_model, evaluate_sites
from braintumnet.io import atomic_write_json
from braintumnet.metrics import mean_sd_columns
from braintumnet.report import SYNTHETIC_NOTE

log = logging.getLogger("braintumnet.train")

def train_centralized(
    sites: Sequence[PreparedSite],
    profile: Profile,
    out: Path,
    *,
    external: Sequence[PreparedSite] = (),
    folds: int = 1,
    epochs: int | None = None,
    device: str = "auto",
    synthetic: bool = False,
    progress: bool = True,
) -> dict:
    """Train on the pooled train splits; evaluate on the pooled and per-site test splits and on ``external``.

    Writes ``out/model.pt`` (self-describing checkpoint), ``out/metrics.json`` and, with ``folds > 1``, one
    model per fold and the cross-validation figures (mean ± sd over folds).
    """
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    classes = task_classes(profile.data.task)
    epochs = epochs or profile.train.epochs
    started = time.perf_counter()

    def fit_and_score(name: str, case_ids=None) -> dict:
        model = build_model(profile, len(classes))
        t0 = time.perf_counter()
        train_metrics = train_model(model, sites, profile, dev, epochs=epochs, case_ids=case_ids, progress=progress)
        train_s = time.perf_counter() - t0
        pooled, _, per_site = evaluate_sites(model, sites, "test", profile, dev, progress=progress)
        result = {
            "train": {**train_metrics, "epochs": epochs, "wall_s": round(train_s, 2)},
            "internal_test": aggregate_metrics(pooled),
            "per_site": {site: aggregate_metrics(m) for site, m in per_site.items()},
        }
        if external:
            result["external"] = evaluate_model(model, external, None, profile, dev, progress=progress)
        save_checkpoint(out / f"{name}.pt", model.state_dict(), profile, classes,
                        {"arm": "centralized", "synthetic": synthetic, "sites": [s.site for s in sites], "epochs": epochs, **(
                            {"fold_held_out": len(case_ids)} if case_ids is not None else {})})
        log.info("%s: internal dice_tumor %.3f acc %.3f (%.0f s)", name,
                 result["internal_test"]["dice_tumor"], result["internal_test"]["acc"], train_s)
        return result

    report: dict = {
        "arm": "centralized",
        "synthetic": synthetic,
        "note": SYNTHETIC_NOTE if synthetic else "",
        "config": to_dict(profile),
        "device": str(dev),
        "sites": [s.site for s in sites],
        "external_sites": [s.site for s in external],
    }
    if folds > 1:
        fold_results = []
        for i, held in enumerate(case_folds(sites, classes, folds, profile.train.seed)):
            train_ids = sorted(set(select_slices(sites, "train", classes)["case_id"]) - set(held))
            res = fit_and_score(f"fold{i + 1}", train_ids)
            res["validation"] = evaluate_model(load_model(out / f"fold{i + 1}.pt", dev)[0], sites, "train",
                                               profile, dev, case_ids=held, progress=progress)
            fold_results.append(res)
        report["folds"] = fold_results
        report["cross_validation"] = mean_sd_columns([r["validation"] for r in fold_results])
        report["internal_test_mean_sd"] = mean_sd_columns([r["internal_test"] for r in fold_results])
    report.update(fit_and_score("model"))
    report["wall_s"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / "metrics.json", report)
    return report
