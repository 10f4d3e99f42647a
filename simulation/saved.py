"""Finished repetitions kept in the study's run folder, so that a long study can be stopped and continued.

A study at the standard profile with three seeds takes hours on a CPU. Each repetition (one seed, one fold) is
written to ``<out>/repetitions/<seed[-fold]>.json`` as soon as every arm of it is trained and scored; running the
same study into the same folder again (``python -m simulation ... --out FOLDER``) reuses every repetition found there
and trains only the others. The report then lists which repetitions were reused and from which commit.

A saved repetition is reused only when the study's settings are the same (:func:`settings_of`: the resolved profile
with its overrides, the federated budgets, the gate regions, the sites and their case counts); otherwise it is
trained again and the file replaced. The first repetition also keeps what the report's figures take from it (the
per-case tables, the first federated run's rounds, the model drawn in the overlays): a repetition saved as a later
one is trained again when it becomes the first.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from braintumnet.io import atomic_write_json

FOLDER = "repetitions"


def settings_of(config: dict, budgets, skip_federated: bool, regions, sites: dict, cases: dict) -> dict:
    """What must be equal for a saved repetition to count: the same study, whatever machine or commit ran it."""
    return {"config": config, "budgets": list(budgets), "skip_federated": bool(skip_federated),
            "gate_regions": list(regions), "sites": sites, "cases": cases}


def path_of(out: Path, seed: int, fold: int | None) -> Path:
    return Path(out) / FOLDER / (f"seed-{seed}" + (f"-fold-{fold + 1}" if fold is not None else "") + ".json")


def save(out: Path, settings: dict, result: dict, *, timings: dict[str, float], provenance: dict,
         first: dict | None) -> Path:
    """Write one finished repetition. ``first`` (the first repetition only): ``cases_of`` (arm -> test set ->
    per-case DataFrame), ``fed_rounds`` and ``overlay_model`` (a checkpoint path relative to ``out``, or None)."""
    record: dict[str, Any] = {"settings": settings, "result": result, "timings": timings,
                              "commit": provenance.get("commit"), "machine": provenance.get("machine"),
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if first is not None:
        record["first"] = {
            "cases_of": {arm: {section: json.loads(table.to_json(orient="split", index=False))
                               for section, table in sections.items()}
                         for arm, sections in first["cases_of"].items()},
            "fed_rounds": first["fed_rounds"], "overlay_model": first["overlay_model"]}
    path = path_of(out, result["seed"], result["fold"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def load(out: Path, seed: int, fold: int | None, settings: dict, *, first: bool) -> dict | None:
    """A saved repetition to reuse, or None (none saved, other settings, unreadable, or saved as a later repetition
    where the first is needed). Returns the record, with ``first.cases_of`` as DataFrames again."""
    path = path_of(out, seed, fold)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("settings") != json.loads(json.dumps(settings)):
        return None
    if first:
        saved = record.get("first")
        if not saved:
            return None
        saved["cases_of"] = {arm: {section: pd.DataFrame(**table) for section, table in sections.items()}
                             for arm, sections in saved["cases_of"].items()}
        if saved.get("overlay_model") and not (Path(out) / saved["overlay_model"]).is_file():
            return None
    record["result"] = {k: v if k in ("seed", "fold") else _undefined_as_nan(v) for k, v in record["result"].items()}
    return record


def _undefined_as_nan(scores):
    """The arms' scores as they were: JSON files hold an undefined metric (NaN) as null."""
    if isinstance(scores, dict):
        return {k: _undefined_as_nan(v) for k, v in scores.items()}
    return math.nan if scores is None else scores
