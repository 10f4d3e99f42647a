"""Finished repetitions kept in the study's run folder, so that a long study can be stopped and continued.

A study at the standard profile with three seeds takes hours on a CPU. Each repetition (one seed, one fold) is
written to ``<out>/repetitions/<seed[-fold]>.json`` as soon as every arm of it is trained and scored; running the
same study into the same folder again (``python -m simulation ... --out FOLDER``) reuses every repetition found there
and trains only the others. The report then lists which repetitions were reused and from which commit.

A saved repetition is reused only when the study's settings are the same (:func:`settings_of`: the resolved profile
with its overrides, the federated budgets, the gate regions, the number of folds, the sites and a digest of each
site's case ids); otherwise it is trained again and the file replaced (removed first, so that a run stopped while
retraining leaves no record beside the new models). A file that cannot be read is trained again too. The first
repetition also keeps what the report's figures take from it (the per-case tables, the first federated run's rounds,
the model drawn in the overlays): a repetition saved as a later one is trained again when it becomes the first.

Each arm is also kept on its own as soon as it is scored (``<out>/repetitions/<seed[-fold]>/<arm>.json``), so that a
study stopped in the middle of a repetition loses at most the arm it was training, and so that a study which only
adds arms (another ``--budget``, ``--gate-regions``, federating after ``--skip-federated``) trains only those: which
arms a study trains does not change how any one of them trains (:func:`arm_settings`). A repetition saved before arms
were kept one by one is split into its arms (:func:`split_repetition`) when its settings differ only in that choice.
An arm whose settings differ only in the post-processing rule is scored again from its kept model (``any_rule``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from braintumnet.io import atomic_write_json
from braintumnet.postprocess import RULE_BEFORE_IT_EXISTED
from simulation.arms import federated_arm_name

FOLDER = "repetitions"
# Settings that choose which arms a study trains, not how an arm trains: a saved arm is reused whatever they are.
ARM_CHOICE_KEYS = ("budgets", "skip_federated", "gate_regions")
log = logging.getLogger("simulation")
SITE_BATCH_KEY = "train.site_batch_size"  # to_dict's name of train.site-batch-size
POSTPROCESS_KEY = "model.postprocess"  # to_dict's name of model.postprocess


def settings_of(config: dict, budgets, skip_federated: bool, regions, folds: int, sites: dict,
                case_ids: dict[str, list[str]]) -> dict:
    """What must be equal for a saved repetition to count: the same study, whatever machine or commit ran it.
    ``case_ids``: site -> its case ids (recorded as a count and a digest: another cohort with the same sites and
    sizes is another study)."""
    return {"config": config, "budgets": list(budgets), "skip_federated": bool(skip_federated),
            "gate_regions": list(regions), "folds": int(folds) if folds >= 2 else 0, "sites": sites,
            "cases": {site: {"n": len(ids), "digest": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]}
                      for site, ids in case_ids.items()}}


def forget(out: Path, seed: int, fold: int | None) -> None:
    """Remove a saved repetition about to be trained again."""
    path_of(out, seed, fold).unlink(missing_ok=True)


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
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("settings") != json.loads(json.dumps(settings)):
            return None
        if first:
            if "first" not in record:
                return None  # kept as a later repetition: its arms are reused (simulation/study.py) without it
            saved = record["first"]
            saved["cases_of"] = {arm: {section: pd.DataFrame(**table) for section, table in sections.items()}
                                 for arm, sections in saved["cases_of"].items()}
            if saved["overlay_model"] and not (Path(out) / saved["overlay_model"]).is_file():
                return None
        record["result"] = {k: v if k in ("seed", "fold") else _undefined_as_nan(v)
                            for k, v in record["result"].items()}
        record["timings"] = {str(arm): float(seconds) for arm, seconds in record["timings"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s could not be read (%s): that repetition is trained again", path, type(exc).__name__)
        return None
    return record


def _undefined_as_nan(scores):
    """The arms' scores as they were: JSON files hold an undefined metric (NaN) as null."""
    if isinstance(scores, dict):
        return {k: _undefined_as_nan(v) for k, v in scores.items()}
    return math.nan if scores is None else scores


def arm_settings(settings: dict) -> dict:
    """What a saved arm must share with the study to be reused: its settings less the choice of arms."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in ARM_CHOICE_KEYS}))


def arm_path(out: Path, seed: int, fold: int | None, arm: str) -> Path:
    return path_of(out, seed, fold).with_suffix("") / f"{arm.replace(':', '-')}.json"


def save_arm(out: Path, settings: dict, seed: int, fold: int | None, arm: str, scores: dict, seconds: float, *,
             provenance: dict, per_case: dict | None = None, fed_rounds: list | None = None,
             model: str | None = None, finished: str | None = None, scored_again: dict | None = None) -> Path:
    """Write one trained and scored arm. ``per_case`` (the first repetition only): test set -> per-case DataFrame
    (or its JSON ``split`` form); ``fed_rounds``: the rounds of the federated run the report's figures draw;
    ``model``: its checkpoint, relative to ``out`` (the overlay figure's model, when this arm provides it);
    ``finished``: when it was trained (default now); ``scored_again``: when its scores are not those of its
    training run, how they were made again (the rule it had been scored with, this commit, the time)."""
    record: dict[str, Any] = {"settings": arm_settings(settings), "arm": arm, "scores": scores,
                              "seconds": float(seconds), "model": model, "commit": provenance.get("commit"),
                              "machine": provenance.get("machine"),
                              "finished": finished or time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if per_case is not None:
        record["per_case"] = {section: table if isinstance(table, dict)
                              else json.loads(table.to_json(orient="split", index=False))
                              for section, table in per_case.items()}
    if fed_rounds is not None:
        record["fed_rounds"] = fed_rounds
    if scored_again is not None:
        record["scored_again"] = scored_again
    path = arm_path(out, seed, fold, arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def load_arm(out: Path, settings: dict, seed: int, fold: int | None, arm: str, *, first: bool,
             any_rule: bool = False) -> dict | None:
    """A saved arm to reuse, or None (none saved, other settings, unreadable, or without the per-case tables and the
    model file that the first repetition needs). ``per_case`` comes back as DataFrames; ``scored_with`` names the
    post-processing rule its scores were computed with.

    ``any_rule``: also an arm scored with another post-processing rule than the study's. The rule cleans the
    trained network's labels and plays no part in training, so such an arm is scored again from its model
    (simulation/study.py) rather than trained again, as nnU-Net chooses its post-processing after training."""
    path = arm_path(out, seed, fold, arm)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        kept, wanted = _for_arm(record.get("settings"), arm), _for_arm(arm_settings(settings), arm)
        if any_rule:
            kept, wanted = _any_rule(kept), _any_rule(wanted)
        if kept != wanted:
            return None
        record["scored_with"] = _for_arm(record["settings"], arm)["config"][POSTPROCESS_KEY]
        if first:
            if "per_case" not in record:
                return None
            record["per_case"] = {section: pd.DataFrame(**table) for section, table in record["per_case"].items()}
            if record.get("model") and not (Path(out) / record["model"]).is_file():
                return None
        record["scores"] = _undefined_as_nan(record["scores"])
        record["seconds"] = float(record["seconds"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s could not be read (%s): that arm is trained again", path, type(exc).__name__)
        return None
    return record


def rescorable(out: Path, settings: dict, seed: int, fold: int | None, arm: str) -> bool:
    """Whether the study can take ``arm`` without training it: kept with the study's settings, or with another
    post-processing rule and its model still in ``out`` (scored again then; :func:`kept_model`)."""
    record = load_arm(out, settings, seed, fold, arm, first=False, any_rule=True)
    if record is None:
        return False
    rule = _for_arm(arm_settings(settings), arm)["config"][POSTPROCESS_KEY]
    return record["scored_with"] == rule or kept_model(out, record, arm, seed, fold).is_file()


def scored_again(out: Path, seed: int, fold: int | None) -> dict[str, str]:
    """Arm -> the rule it had been scored with, for each arm of repetition ``seed`` (``fold``) that a study scored
    again from its model (its own record says so): a study that reuses the whole repetition names them too."""
    folder = path_of(out, seed, fold).with_suffix("")
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # an unreadable arm is trained again when it is needed; here it only lacks the note
        again = record.get("scored_again") if isinstance(record, dict) else None
        if isinstance(again, dict) and isinstance(record.get("arm"), str):
            found[record["arm"]] = str(again.get("from"))
    return found


def model_file(out: Path, arm: str, seed: int, fold: int | None) -> Path:
    """Where the study keeps the checkpoint of an arm it trains in-process (a federated arm's is in its run folder)."""
    return Path(out) / "models" / (f"{arm.replace(':', '-')}-s{seed}" + (f"-f{fold + 1}" if fold is not None else "")
                                   + ".pt")


def kept_model(out: Path, record: dict, arm: str, seed: int, fold: int | None) -> Path:
    """The checkpoint of a kept arm: the one its record names (relative to ``out``), or the study's own
    :func:`model_file` for a record that names none (an arm split out of a repetition kept whole names only the
    overlay figure's model)."""
    return Path(out) / record["model"] if record.get("model") else model_file(out, arm, seed, fold)


def _any_rule(settings):
    """``settings`` (as :func:`_for_arm` gives them) less the post-processing rule."""
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        return settings
    return {**settings, "config": {k: v for k, v in settings["config"].items() if k != POSTPROCESS_KEY}}


def _pooled(arm: str) -> bool:
    """An arm trained on the pooled data (centralized, a Table 2 region), never in a site's batch."""
    return arm == "centralized" or arm.startswith("gate:")


def _for_arm(settings, arm: str):
    """The settings that decide how ``arm`` trains and is scored. A pooled arm never trains in a site's batch, so
    ``train.site_batch_size`` does not count for it; for the others it counts as the batch a site used (0, or no key
    in records kept before it existed: the pooled batch). A record kept before ``model.postprocess`` existed scored
    the network's labels as they are: ``none``."""
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        return settings
    config = {k: v for k, v in settings["config"].items() if k != SITE_BATCH_KEY}
    config.setdefault(POSTPROCESS_KEY, RULE_BEFORE_IT_EXISTED)
    if not _pooled(arm):
        config[SITE_BATCH_KEY] = settings["config"].get(SITE_BATCH_KEY) or settings["config"].get("train.batch_size")
    return {**settings, "config": config}


def _before_digests(saved: dict, settings: dict, path: Path) -> dict:
    """A repetition saved before the number of folds and each site's case-id digest were recorded (it has only each
    site's case count, and no folds: it ran without cross-validation) compared as it would be saved today, when its
    counts equal the study's. The digest cannot be checked then: the warning says so."""
    if "folds" in saved or not all(isinstance(n, int) for n in saved.get("cases", {}).values()):
        return saved
    now = settings.get("cases", {})
    if saved["cases"] != {site: c.get("n") for site, c in now.items()}:
        return saved
    log.warning("%s was saved before case ids were recorded: reused on equal case counts per site", path)
    return {**saved, "folds": 0, "cases": now}


def split_repetition(out: Path, seed: int, fold: int | None, settings: dict) -> list[str]:
    """Keep each arm of the saved repetition ``seed`` (``fold``) as a saved arm, when its settings differ from
    ``settings`` at most in the choice of arms (or, for its pooled arms only, in each site's batch); arms already
    kept on their own are left as they are. Returns the arms written."""
    path = path_of(out, seed, fold)
    try:
        record = json.loads(path.read_text())
        kept, now = arm_settings(_before_digests(record["settings"], settings, path)), arm_settings(settings)
        # Kept with another site batch: its pooled arms still count, its others not.
        if _for_arm(kept, "centralized") != _for_arm(now, "centralized"):
            return []
        first = record.get("first") or {}
        # The overlay model is the first budget's federated model when the study federated, else the centralized one.
        federated = federated_arm_name((record["settings"].get("budgets") or ["epochs"])[0])
        overlay = first.get("overlay_model")
        overlay_arm = "centralized" if overlay and overlay.startswith("models/") else federated
        written = []
        for arm, scores in record["result"].items():
            if arm in ("seed", "fold") or arm_path(out, seed, fold, arm).is_file() or (
                    _for_arm(kept, arm) != _for_arm(now, arm)):
                continue
            save_arm(out, settings, seed, fold, arm, scores, record["timings"].get(arm, 0.0), provenance=record,
                     per_case=first.get("cases_of", {}).get(arm),
                     fed_rounds=first.get("fed_rounds") if arm == federated else None,
                     model=overlay if arm == overlay_arm else None, finished=record.get("finished"))
            written.append(arm)
        return written
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []  # nothing to split (none saved, or unreadable: its arms are trained again)
