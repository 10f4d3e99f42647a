"""Accuracy against baselines on the phantom cohort, in the simulation report's metric names.

Arms, all trained centrally on the pooled internal training split with the project's own ``train_model`` (same
data, augmentation, Adam + cosine schedule, batch, epochs and seed) and scored with ``evaluate_model`` on the pooled
internal test split and the external site:

* BrainTumNet multi-task (the reference) and two-stage (``mode="two-stage"``: the segmenter trains for the first
  half of the epochs, then the classifier on the detached predicted-tumour gate, i.e. on the image masked by the
  predicted tumour), and multi-task with the gate detached (``gate_gradient=False``: both tasks train together from
  the start, but the classification loss no longer reaches the segmenter);
* ablations: without the adaptive masked transformer (BT Blocks), without the Inception module (T-Inception blocks
  -> plain 3×3 convolutions), without CBAM;
* segmentation baselines (``bench.models``): BasicUNet, DynUNet (nnU-Net), SwinUNETR (2-D) — DiceCE only, no
  classification figures;
* classification baselines on the whole slice: DenseNet121, ResNet-18, ResNet-50 — cross-entropy only, no
  segmentation figures.

``full`` mode uses the simulation's ``standard`` profile and its phantom cohort (scale 0.3, seed 0: the same cases
and splits as ``python -m simulation --profile standard``); ``--quick`` is a tiny version that proves the pipeline.

Each arm is seeded on its own, so arms trained in separate runs are the runs one process would have made. A full run
takes hours on a CPU, so every finished arm is kept in ``<out>/accuracy-arms-<mode>/<key>.json`` with its settings,
code commit and machine; a later run reuses an arm whose settings match (``--fresh`` retrains), ``--arms`` picks
which to train (two processes can split them), and every run rewrites the tables from all kept arms, naming the ones
still missing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import torch

from bench import models
from bench.common import SYNTHETIC, Context, fmt, ratio, table, write_result
from bench.machine import one_line
from braintumnet.config import resolve
from braintumnet.data.contract import EXTERNAL_SITE, SITES
from braintumnet.data.contract import class_names as task_classes
from braintumnet.io import atomic_write_json
from braintumnet.postprocess import RULE_BEFORE_IT_EXISTED
from braintumnet.metrics import METRIC_NAMES

REFERENCE = "BrainTumNet (multi-task)"
SEG_METRICS = ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "dice_whole")
CLS_METRICS = ("acc", "sensitivity", "specificity", "f1", "auc")
PAPER_CLAIM = {"dice_tumor_points": 2.1, "acc_points": 2.7}  # multi-task over two-stage, the paper's claim
FULL_COMMAND = "python -m bench --only accuracy"
# The short name of each arm (``--arms``) and the name its tables show.
ARM_KEYS = {"multitask": REFERENCE, "two-stage": "BrainTumNet two-stage",
            "detached-gate": "multi-task, gate detached",
            "no-transformer": "without adaptive masked transformer", "no-inception": "without Inception module",
            "no-cbam": "without CBAM",
            # The same ablations with the gate detached: on this cohort the attached gate holds the segmenter back
            # (multi-task against "gate detached"), which would hide what each block adds to segmentation.
            "detached-no-transformer": "gate detached, without adaptive masked transformer",
            "detached-no-inception": "gate detached, without Inception module",
            "detached-no-cbam": "gate detached, without CBAM", "basicunet": "BasicUNet", "dynunet": "DynUNet (nnU-Net)",
            "swinunetr": "SwinUNETR", "densenet121": "DenseNet121", "resnet18": "ResNet-18",
            "resnet50": "ResNet-50"}


def _settings(ctx: Context) -> dict:
    if ctx.tiny:
        return {"run_config": {"profile": "quick", "data.img-size": 32, "data.slices-per-case": 3,
                               "model.feature-size": 8, "train.batch-size": 8},
                "phantom": 0.03, "epochs": 1, "subset": True}
    if ctx.quick:
        return {"run_config": {"profile": "quick", "data.slices-per-case": 4},
                "phantom": 0.1, "epochs": 3, "subset": False}
    from simulation.cohort import PHANTOM_SCALE

    profile = resolve({"profile": "standard"})
    return {"run_config": {"profile": "standard"}, "phantom": PHANTOM_SCALE["standard"],
            "epochs": profile.federation.num_rounds * profile.federation.local_epochs, "subset": False}


def arms(profile, num_classes: int, subset: bool = False) -> dict[str, tuple[str, object]]:
    """name -> (kind, factory); kind is ``multitask``, ``two-stage``, ``seg`` or ``cls``."""
    width = {"feature_size": profile.model.feature_size, "num_heads": profile.model.num_heads,
             "img_size": profile.data.img_size, "num_classes": num_classes}
    btn = lambda **kw: (lambda: models.braintumnet(**width, **kw))  # noqa: E731
    # The arms named "multi-task" and the first three ablations keep the gate attached, as they were measured (the
    # paper's joint training); the model's default is now detached (docs/model-card.md, bench/joint.py).
    found = {
        REFERENCE: ("multitask", btn(gate_gradient=True)),
        "BrainTumNet two-stage": ("two-stage", btn(mode="two-stage")),
        "multi-task, gate detached": ("multitask", btn(gate_gradient=False)),
        "without adaptive masked transformer": ("multitask", btn(gate_gradient=True, use_transformer=False)),
        "without Inception module": ("multitask", btn(gate_gradient=True, use_inception=False)),
        "without CBAM": ("multitask", btn(gate_gradient=True, use_cbam=False)),
        "gate detached, without adaptive masked transformer": ("multitask",
                                                               btn(gate_gradient=False, use_transformer=False)),
        "gate detached, without Inception module": ("multitask", btn(gate_gradient=False, use_inception=False)),
        "gate detached, without CBAM": ("multitask", btn(gate_gradient=False, use_cbam=False)),
    }
    target = models.params(models.braintumnet(**width))
    segs = models.segmentation_baselines(profile.model.feature_size, profile.data.img_size, num_classes, target)
    swins = [n for n in segs if n.startswith("SwinUNETR")]
    if len(swins) > 1:  # train only the SwinUNETR closest to BrainTumNet in parameters
        closest = min(swins, key=lambda n: abs(models.params(segs[n]()) - target))
        segs = {n: f for n, f in segs.items() if not n.startswith("SwinUNETR") or n == closest}
    found.update({n: ("seg", f) for n, f in segs.items()})
    found.update({n: ("cls", f) for n, f in models.classifier_baselines(num_classes).items()})
    if subset:
        keep = (REFERENCE, "BrainTumNet two-stage", "without CBAM", "BasicUNet", "ResNet-18")
        found = {n: v for n, v in found.items() if n in keep}
    return found


def arm_key(name: str) -> str:
    """The ``--arms`` key of a table name (``SwinUNETR fs12`` -> ``swinunetr``)."""
    for key, shown in ARM_KEYS.items():
        if name == shown or (shown == "SwinUNETR" and name.startswith("SwinUNETR")):
            return key
    raise KeyError(name)


def _commit() -> str | None:
    """The code's commit at the start of the run, ``-dirty`` when tracked files differ from it; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here).stdout.strip()
        # bench/results/ holds outputs (another arm's process rewrites the tables), not code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], capture_output=True, text=True, timeout=10,
                               cwd=here.parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


class ArmStore:
    """Finished arms of one mode, one JSON file each, valid only for the settings they were trained with.

    A kept file may carry a ``note`` (say, that its run was paused, so its ``train_s`` is not its compute time); the
    Provenance table shows it.
    """

    def __init__(self, ctx: Context, settings: dict, postprocess: str):
        mode = "tiny" if ctx.tiny else "quick" if ctx.quick else "full"
        self.root = ctx.out / f"accuracy-arms-{mode}"
        # As it reads back from JSON; with the rule that scored the arm (docs/metrics.md, "Post-processing").
        self.settings = json.loads(json.dumps({**settings, "postprocess": postprocess}))

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str) -> dict | None:
        try:
            kept = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(kept.get("settings"), dict):
            return None
        return kept if {"postprocess": RULE_BEFORE_IT_EXISTED, **kept["settings"]} == self.settings else None

    def save(self, key: str, name: str, result: dict, machine: dict, commit: str | None) -> dict:
        """Keep a finished arm; returns what was written, as ``load`` would read it back."""
        doc = {"name": name, "settings": self.settings, "commit": commit, "machine": one_line(machine),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "result": result}
        atomic_write_json(self.path(key), doc)  # a run stopped mid-write leaves no half file behind
        return doc


def _train_arm(kind: str, factory, profile, internal: list, external, dev: torch.device) -> dict:
    """Train one arm on the pooled internal training split and score it on the internal test split and the external
    site; a task the arm does not do gets no figures (None), not chance-level ones."""
    from braintumnet.engine import train_model
    from braintumnet.scoring import evaluate_model

    if kind == "two-stage":
        profile = dataclasses.replace(profile, model=dataclasses.replace(profile.model, mode="two-stage"))
    torch.manual_seed(profile.train.seed)
    model = factory()
    t0 = time.perf_counter()
    stats = train_model(model, internal, profile, dev, epochs=profile.train.epochs, progress=False)
    train_s = time.perf_counter() - t0
    scored = {"internal_test": evaluate_model(model, internal, "test", profile, dev, progress=False),
              "external": evaluate_model(model, [external], None, profile, dev, progress=False)}
    for section in scored.values():
        for k in (CLS_METRICS if kind == "seg" else SEG_METRICS if kind == "cls" else ()):
            section[k] = None
    return {"kind": kind, "params": models.params(model), "train_s": round(train_s, 1),
            "train_loss": stats["train_loss"], **scored}


def run(ctx: Context, sites: dict | None = None) -> dict:
    from braintumnet.data.loading import load_sites

    commit = _commit()  # before anything slow: the code this process imported, not what the tree holds later
    if ctx.device == "cpu":
        torch.set_num_threads(1)
    s = _settings(ctx)
    profile = resolve(s["run_config"])
    epochs = s["epochs"]
    profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, epochs=epochs))
    classes = task_classes(profile.data.task)
    if sites is None:
        phantom = ctx.phantom(s["phantom"]).out
        loaded = load_sites([phantom / n for n in (*SITES, EXTERNAL_SITE)], ctx.cache, profile.data,
                            progress=False)
        sites = {p.site: p for p in loaded}
    internal = [sites[n] for n in SITES]
    dev = torch.device(ctx.device)
    store = ArmStore(ctx, s, profile.model.postprocess)
    every = arms(profile, len(classes), s["subset"])
    chosen = list(ctx.arms) if ctx.arms is not None else [arm_key(n) for n in every]  # () = train none
    # Train in the order asked for (a second process can work from the other end); show in the table's order. An arm
    # is looked up just before it would be trained, so one that another process has finished meanwhile is kept.
    for name in sorted((n for n in every if arm_key(n) in chosen), key=lambda n: chosen.index(arm_key(n))):
        kind, factory = every[name]
        key = arm_key(name)
        kept = None if ctx.fresh else store.load(key)
        if kept is not None:
            ctx.say(f"accuracy: {name}: kept from {kept['finished']} ({kept['commit']}), not retrained")
            continue
        result = _train_arm(kind, factory, profile, internal, sites[EXTERNAL_SITE], dev)
        store.save(key, name, result, ctx.machine, commit)
        r = result["internal_test"]
        ctx.say(f"accuracy: {name}: {result['train_s']:.0f} s; internal dice_tumor {fmt(r['dice_tumor'])} "
                f"acc {fmt(r['acc'])}")
    # The table: every kept arm, read once training is done (so also those another process finished meanwhile).
    kept_arms = {n: kept for n in every if (kept := store.load(arm_key(n))) is not None}
    results = {n: kept_arms[n]["result"] for n in every if n in kept_arms}
    provenance = {n: {k: kept_arms[n].get(k) for k in ("commit", "machine", "finished", "note")}
                  for n in every if n in kept_arms}
    missing = [arm_key(n) for n in every if n not in results]
    ref = results.get(REFERENCE)
    for r in results.values():
        r["ratio_to_braintumnet"] = {
            section: {m: ratio(r[section].get(m), ref[section].get(m) if ref else None)
                      for m in ("dice_tumor", "dice_whole", "acc", "auc")}
            for section in ("internal_test", "external")}
    two = results.get("BrainTumNet two-stage")
    claim = None
    if two and ref:
        claim = {section: {"dice_tumor_points": 100 * (ref[section]["dice_tumor"] - two[section]["dice_tumor"]),
                           "acc_points": 100 * (ref[section]["acc"] - two[section]["acc"])}
                 for section in ("internal_test", "external")}
    doc = {
        "synthetic": True, "note": SYNTHETIC, "profile": s["run_config"], "epochs": epochs,
        "phantom_scale": s["phantom"], "cases": {n: int(p.slices["case_id"].nunique()) for n, p in sites.items()},
        "train_slices": int(sum(len(p.indices("train", profile.data.task)) for p in internal)),
        "arms": results, "provenance": provenance, "missing_arms": missing,
        "multitask_minus_two_stage": claim, "paper_claim": PAPER_CLAIM, "full_scale_command": FULL_COMMAND,
    }
    return write_result(ctx, "accuracy", "Accuracy against baselines and ablations (SYNTHETIC phantom cohort)", doc,
                        _sections(doc), _notes(ctx, doc))


def _notes(ctx: Context, doc: dict) -> list[str]:
    notes = [f"**{SYNTHETIC}**",
             f"Run config {doc['profile']}, {doc['epochs']} epochs, phantom scale {doc['phantom_scale']} (cases per "
             f"site: {', '.join(f'{k} {v}' for k, v in doc['cases'].items())}; {doc['train_slices']} training "
             "slices). Every arm: the same train_model (data, augmentation, Adam with cosine decay, batch, seed) "
             "and evaluate_model; metrics per case, then averaged (docs/metrics.md). '—': a task the arm does not "
             "do."]
    if doc["missing_arms"]:
        notes.append(f"**Not trained yet: {', '.join(doc['missing_arms'])}.** Train them with "
                     f"`{FULL_COMMAND} --arms {','.join(doc['missing_arms'])}`; the arms above are kept and not "
                     "retrained.")
    commits = sorted({p["commit"] or "unknown" for p in doc["provenance"].values()})
    if len({(p["commit"], p["machine"]) for p in doc["provenance"].values()}) > 1:  # a run's machine line is its own
        notes.append("Arms were trained in separate runs (each seeded on its own, so the figures are the ones one run "
                     "would give); code commits: " + ", ".join(commits) + ". The `Provenance` table says which run "
                     "trained which arm.")
    if ctx.quick or ctx.tiny:
        notes.append(f"This is the `--quick` version (tiny cohort, few epochs): it proves the pipeline, and its "
                     f"figures are far too noisy to compare methods. The standard-scale table (the simulation's "
                     f"`standard` profile, phantom scale 0.3, 40 epochs; hours on a CPU) is `{FULL_COMMAND}`.")
    return notes


def _sections(doc: dict) -> list[tuple[str, list[str]]]:
    sections = []
    for section, title in (("internal_test", "Pooled internal test set"),
                           ("external", "External site (never trained on)")):
        rows = [[name, a["kind"], a["params"] / 1e6, *(a[section].get(m) for m in METRIC_NAMES)]
                for name, a in doc["arms"].items()]
        sections.append((title, table(["arm", "kind", "params (M)", *METRIC_NAMES], rows)))
    rows = [[name, *(a["ratio_to_braintumnet"][s][m] for s in ("internal_test", "external")
                     for m in ("dice_tumor", "acc"))] for name, a in doc["arms"].items()]
    sections.append(("Ratio to BrainTumNet multi-task (1.0 = parity)",
                     table(["arm", "internal dice_tumor", "internal acc", "external dice_tumor", "external acc"],
                           rows)))
    if doc["multitask_minus_two_stage"]:
        c = doc["multitask_minus_two_stage"]
        rows = [[s, c[s]["dice_tumor_points"], c[s]["acc_points"]] for s in c]
        rows.append(["paper's claim", PAPER_CLAIM["dice_tumor_points"], PAPER_CLAIM["acc_points"]])
        sections.append(("Multi-task minus two-stage, in points (×100)",
                         table(["set", "dice_tumor points", "acc points"], rows, digits=1)))
    sections.append(("Wall time", table(["arm", "train s", "last-epoch train loss"],
                                        [[n, a["train_s"], a["train_loss"]] for n, a in doc["arms"].items()])))
    sections.append(("Provenance", table(["arm", "commit", "finished", "machine", "note"],
                                         [[n, p["commit"], p["finished"], p["machine"], p.get("note") or ""]
                                          for n, p in doc["provenance"].items()])))
    return sections
