"""Which joint model: how BrainTumNet links segmentation and classification, measured over seeds (SYNTHETIC).

Every arm is trained centrally on the pooled internal training split with the project's own ``train_model`` and
scored with ``evaluate_model`` (the study's metrics) on the pooled internal test split and the external site, once
per seed; the tables show mean ± sd over seeds. Arms differ only in ``BrainTumNet``'s switches, so each row isolates
one decision:

* ``multitask``: the default model of the run config (``model.*`` in pyproject.toml);
* ``two-stage``: the same network, segmentation trained first, then the classifier on the frozen segmenter, each
  stage annealed over its own half of the epochs (the paper's "two-stage" comparison);
* ``detached``: multi-task with the gate detached and no shared features (the two tasks share nothing);
* ``attached``: multi-task with the classification loss training the segmenter through the gate;
* ``no-transformer``, ``no-inception``, ``no-cbam``: the default without the adaptive masked transformer (BT Blocks),
  the Inception module, or CBAM (the paper's ablations).

The paper claims multi-task over two-stage +2.1 points of DSC and +2.7 of accuracy; the table gives our difference
per seed (paired: the same seed draws the same initial weights and batches in both arms) with its mean and sd.

Sizes: full mode trains at a simulation profile's size on that profile's phantom cohort: ``--profile quick`` (the
default; phantom scale 0.1 with the study's test and external sets of scale 0.3, 30 epochs, a few minutes per
arm-seed on a CPU core; results ``joint.md``) or
``--profile standard`` (scale 0.3, 40 epochs, about 15-25 min per arm-seed on a CPU core; results
``joint-standard.md``, the size the study's quoted figures use). ``--quick`` is the test suite's tiny size (pipeline
only). Finished arm-seeds are kept in ``<out>/joint-arms-<size>/`` (like the accuracy benchmark) and reused while their
settings match, so a long comparison can be run a few arm-seeds at a time (``--arms``, ``--seeds``).

An arm whose switches leave the default model unchanged (``detached`` while the default shares nothing) is the default
itself: it is not trained a second time, and the tables say so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from bench.common import SYNTHETIC, Context, fmt, table, write_result
from bench.machine import one_line
from braintumnet.config import resolve
from braintumnet.data.contract import EXTERNAL_SITE, SITES
from braintumnet.data.contract import class_names as task_classes
from braintumnet.io import atomic_write_json
from braintumnet.postprocess import RULE_BEFORE_IT_EXISTED
from braintumnet.metrics import mean_sd

ARMS = {
    "multitask": ("multi-task (default)", {}, {}),
    "two-stage": ("two-stage", {"mode": "two-stage"}, {}),
    "detached": ("multi-task, tasks share nothing (gate detached, no shared features)",
                 {"gate_gradient": False, "shared_features": False}, {}),
    "attached": ("multi-task, gate attached", {"gate_gradient": True}, {}),
    "no-transformer": ("default without adaptive masked transformer", {}, {"use_transformer": False}),
    "no-inception": ("default without Inception module", {}, {"use_inception": False}),
    "no-cbam": ("default without CBAM", {}, {"use_cbam": False}),
}
METRICS = ("dice_tumor", "dice_edema", "hd95_tumor_mm", "acc", "auc")
PAPER_CLAIM = {"dice_tumor": 2.1, "acc": 2.7}  # multi-task over two-stage, points


def _settings(ctx: Context) -> dict:
    if ctx.tiny or ctx.quick:
        return {"run_config": {"profile": "quick", "data.img-size": 32, "data.slices-per-case": 3,
                               "model.feature-size": 8}, "phantom": 0.03, "epochs": 1}
    from simulation.cohort import cohort_scales

    profile = resolve({"profile": ctx.profile})
    scale, test_scale = cohort_scales(ctx.profile, None)
    settings = {"run_config": {"profile": ctx.profile}, "phantom": scale,
                "epochs": profile.federation.num_rounds * profile.federation.local_epochs}
    # The study's test sets: quick scores on test and external sets of a larger scale than it trains on. The key is
    # there only where a profile has one, so that the kept arm-seeds of the others still match their settings.
    return {**settings, "test_scale": test_scale} if test_scale else settings


def size_name(ctx: Context) -> str:
    """The kept arm-seeds' folder suffix: ``tiny``, ``quick`` (the ``--quick`` mode), ``full`` (full mode at the
    quick profile, the name the kept results have always had) or the profile's name."""
    if ctx.tiny or ctx.quick:
        return "tiny" if ctx.tiny else "quick"
    return "full" if ctx.profile == "quick" else ctx.profile


def same_as_default(key: str, model_defaults: dict) -> bool:
    """True when the arm only sets model switches to the values the default already has (it would retrain the
    default under another name)."""
    _, model_changes, switches = ARMS[key]
    return not switches and bool(model_changes) and all(
        model_defaults.get(name) == value for name, value in model_changes.items())


def train_arm(key: str, seed: int, settings: dict, internal: list, external, dev: torch.device) -> dict:
    """One arm, one seed: train on the pooled internal training split, score internal test and external."""
    from braintumnet.engine import build_model, train_model
    from braintumnet.scoring import evaluate_model

    _, model_changes, switches = ARMS[key]
    profile = resolve({**settings["run_config"], "train.seed": seed})
    profile = dataclasses.replace(profile, model=dataclasses.replace(profile.model, **model_changes),
                                  train=dataclasses.replace(profile.train, epochs=settings["epochs"]))
    model = build_model(profile, len(task_classes(profile.data.task)), **switches)
    t0 = time.perf_counter()
    train_model(model, internal, profile, dev, epochs=settings["epochs"], progress=False)
    return {"train_s": round(time.perf_counter() - t0, 1),
            "internal_test": evaluate_model(model, internal, "test", profile, dev, progress=False),
            "external": evaluate_model(model, [external], None, profile, dev, progress=False)}


def run(ctx: Context, sites: dict | None = None) -> dict:
    from braintumnet.data.loading import load_sites

    if ctx.device == "cpu":
        torch.set_num_threads(1)
    s = _settings(ctx)
    profile = resolve(s["run_config"])
    if sites is None:
        phantom = ctx.phantom(s["phantom"], test_scale=s.get("test_scale")).out
        sites = {p.site: p for p in load_sites([phantom / n for n in (*SITES, EXTERNAL_SITE)], ctx.cache,
                                               profile.data, progress=False)}
    internal = [sites[n] for n in SITES]
    dev = torch.device(ctx.device)
    seeds = ctx.seeds or (0, 1, 2)
    model_defaults = dataclasses.asdict(profile.model)
    duplicates = [k for k in ARMS if same_as_default(k, model_defaults)]
    keys = [k for k in ARMS if (ctx.arms is None or k in ctx.arms) and k not in duplicates]
    store = ctx.out / f"joint-arms-{size_name(ctx)}"
    store.mkdir(parents=True, exist_ok=True)
    for key in keys:
        for seed in seeds:
            path = store / f"{key}-s{seed}.json"
            kept = _load(path, s, model_defaults)
            if kept is not None and not ctx.fresh:
                continue
            result = train_arm(key, seed, s, internal, sites[EXTERNAL_SITE], dev)
            doc = {"arm": key, "seed": seed, "settings": s, "model_defaults": model_defaults,
                   "machine": one_line(ctx.machine), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "result": result}
            atomic_write_json(path, doc)
            r = result["internal_test"]
            ctx.say(f"joint: {key} seed {seed}: {result['train_s']:.0f} s; internal dice_tumor "
                    f"{fmt(r['dice_tumor'])} acc {fmt(r['acc'])}")
    kept_docs = {k: {seed: kept for seed in seeds
                     if (kept := _load(store / f"{k}-s{seed}.json", s, model_defaults)) is not None} for k in ARMS}
    runs = {k: {seed: kept["result"] for seed, kept in v.items()} for k, v in kept_docs.items() if v}
    doc = {"synthetic": True, "note": SYNTHETIC, "size": size_name(ctx), "settings": s, "seeds": list(seeds),
           "model_defaults": model_defaults,
           "arms": {k: _summary(v) for k, v in runs.items()}, "per_seed": runs,
           "multitask_minus_two_stage": _paired(runs.get("multitask"), runs.get("two-stage")),
           # Each other arm against the default on the seeds both ran: arms trained on different seed sets are
           # compared only pairwise, since one seed's figures move by several points with the seed alone.
           "minus_default": {k: _paired(v, runs.get("multitask")) for k, v in runs.items() if k != "multitask"
                             and runs.get("multitask")},
           "paper_claim_points": PAPER_CLAIM, "same_as_default": duplicates,
           "processors": _processors(kept_docs),
           "missing": [k for k in ARMS if k not in runs and k not in duplicates]}
    # Seeds of an arm not shown (the whole arm, or some of its seeds) whose kept records were made otherwise.
    otherwise = {k: (absent, _kept_otherwise(store, k, absent, s, model_defaults)) for k in ARMS
                 if k not in duplicates and (absent := [seed for seed in seeds if seed not in runs.get(k, {})])}
    doc["kept_otherwise"] = {k: {"seeds": absent, "differ": why} for k, (absent, why) in otherwise.items() if why}
    name = "joint" if size_name(ctx) in ("tiny", "quick", "full") else f"joint-{ctx.profile}"
    return write_result(ctx, name, "Which joint model: multi-task, two-stage, detached, ablations (SYNTHETIC)", doc,
                        _sections(doc), _notes(doc))


def _processors(kept_docs: dict) -> dict:
    """The processor each kept arm-seed trained on, with its torch thread count (both change the order of
    floating-point sums), by arm and seed: from the start of its machine line."""
    def processor(machine: str) -> str:
        threads = re.search(r"\((\d+) thread", machine)
        return machine.split(",")[0] + (f", {threads[1]} torch thread(s)" if threads else "")

    return {k: {seed: processor(str(kept.get("machine", "unknown"))) for seed, kept in v.items()}
            for k, v in kept_docs.items() if v}


def _record(settings: dict, model_defaults: dict | None) -> dict:
    """A kept arm-seed's settings as one flat mapping (``settings.*``, ``model.*``), the form in which records are
    compared. A record kept before the post-processing existed was scored without it."""
    flat = {f"settings.{k}": v for k, v in json.loads(json.dumps(settings)).items()}
    if not isinstance(model_defaults, dict):
        return {**flat, "model": "not recorded"}
    return {**flat, **{f"model.{k}": v for k, v in {"postprocess": RULE_BEFORE_IT_EXISTED, **model_defaults}.items()}}


def _read(path: Path) -> dict | None:
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and isinstance(kept.get("settings"), dict) else None


def _load(path: Path, settings: dict, model_defaults: dict) -> dict | None:
    """The kept arm-seed at ``path`` if it was made with these settings and model defaults, else None."""
    kept = _read(path)
    if kept is None:
        return None
    return kept if _record(kept["settings"], kept.get("model_defaults")) == _record(settings, model_defaults) else None


def _kept_otherwise(store: Path, key: str, seeds, settings: dict, model_defaults: dict) -> list[str]:
    """The settings (``settings.*``, ``model.*``) in which this arm's kept records of these seeds differ from this
    run's: a record of an earlier run (say, scored before the post-processing existed) is not shown beside today's
    figures, and the report says why rather than calling the arm never trained. Empty where no record is kept."""
    now = _record(settings, model_defaults)
    differ: set[str] = set()
    for seed in seeds:
        if (kept := _read(store / f"{key}-s{seed}.json")) is not None:
            then = _record(kept["settings"], kept.get("model_defaults"))
            differ |= {k for k in now.keys() | then.keys() if now.get(k) != then.get(k)}
    return sorted(differ)


def _summary(per_seed: dict) -> dict:
    out = {section: {m: _cell(r[section].get(m) for r in per_seed.values()) for m in METRICS}
           for section in ("internal_test", "external")}
    out["train_s"] = mean_sd(r["train_s"] for r in per_seed.values())[0]
    out["seeds"] = sorted(per_seed)
    return out


def _cell(values) -> dict:
    """Mean, sd and count of a metric over seeds; the mean None where no seed defines it, the sd where fewer than
    two do."""
    mean, sd, n = mean_sd(values)
    return {"mean": mean if n else None, "sd": sd if n > 1 else None, "n": n}


def _paired(multi: dict | None, two: dict | None) -> dict | None:
    """``multi`` minus ``two`` (multi-task minus two-stage, or an arm minus the default), in points (x100), per seed
    both arms ran, with mean and sd; None where they share no seed."""
    if not multi or not two:
        return None
    seeds = sorted(set(multi) & set(two))
    if not seeds:
        return None
    out = {"seeds": seeds}
    for section in ("internal_test", "external"):
        out[section] = {}
        for m in ("dice_tumor", "acc"):
            diffs = [100 * (multi[s][section][m] - two[s][section][m]) for s in seeds]
            cell = _cell(diffs)
            out[section][m] = {"per_seed": diffs, "mean": cell["mean"], "sd": cell["sd"]}
    return out


def _pm(cell: dict) -> str:
    if cell["mean"] is None:
        return "—"
    return fmt(cell["mean"]) + (f" ± {fmt(cell['sd'])}" if cell["sd"] is not None else "")


def _points(cell: dict) -> str:
    """A paired difference in points: mean ± sd (the sd only from two seeds on), then each seed's value."""
    sd = f" ± {cell['sd']:.1f}" if cell["sd"] is not None else " (one seed: no sd)"
    return f"{cell['mean']:+.1f}{sd} ({', '.join(f'{d:+.1f}' for d in cell['per_seed'])})"


def _sections(doc: dict) -> list[tuple[str, list[str]]]:
    sections = []
    for section, title in (("internal_test", "Pooled internal test set, mean ± sd over seeds"),
                           ("external", "External site (never trained on), mean ± sd over seeds")):
        rows = [[ARMS[k][0], ", ".join(map(str, a.get("seeds", []))), *(_pm(a[section][m]) for m in METRICS)]
                for k, a in doc["arms"].items()]
        sections.append((title, table(["arm", "seeds", *METRICS], rows)))
    claim = doc["multitask_minus_two_stage"]
    if claim:
        rows = [[f"ours, {section}", *(_points(c) for c in (claim[section]["dice_tumor"], claim[section]["acc"]))]
                for section in ("internal_test", "external")]
        rows.append(["the paper's claim", f"+{PAPER_CLAIM['dice_tumor']}", f"+{PAPER_CLAIM['acc']}"])
        sections.append(("Multi-task minus two-stage, points (mean ± sd, per seed)",
                         table(["", "dice_tumor", "acc"], rows)))
    versus = [(k, d) for k, d in doc.get("minus_default", {}).items() if d]
    if versus:
        rows = [[ARMS[k][0], ", ".join(map(str, d["seeds"])),
                 *(_points(d[section][m]) for section in ("internal_test", "external") for m in ("dice_tumor", "acc"))]
                for k, d in versus]
        sections.append(("Each arm minus the default, points (mean ± sd, per seed; on the seeds both ran)",
                         table(["arm", "seeds", "internal dice_tumor", "internal acc", "external dice_tumor",
                                "external acc"], rows)))
    sections.append(("Train time per arm-seed (s)", table(["arm", "mean s"], [[ARMS[k][0], a["train_s"]]
                                                                            for k, a in doc["arms"].items()])))
    return sections


def _notes(doc: dict) -> list[str]:
    s = doc["settings"]
    d = doc["model_defaults"]
    notes = [f"**{SYNTHETIC}**",
             f"Run config {s['run_config']}, {s['epochs']} epochs, phantom scale {s['phantom']}"
             + (f" (its test and external sets of scale {s['test_scale']}, as in the study)" if s.get("test_scale")
                else "") + ", seeds "
             f"{doc['seeds']}. Default model: gate_gradient={d['gate_gradient']}, shared_features="
             f"{d['shared_features']}, shared_gradient={d['shared_gradient']}, gate_floor={d['gate_floor']}. "
             "Metrics per case, then averaged (docs/metrics.md).",
             "The transformer ablation cannot separate local from global attention at 64 px: the bottleneck is "
             "4 × 4 tokens and one 4 × 4 window covers it, so the local and the global branch attend over the same "
             "tokens; it measures the BT Blocks as a whole, not the masking. At 256 px (16 × 16 tokens, 16 windows) "
             "the two differ.",
             "With the gate detached and no shared features (the default) the classification loss cannot reach the "
             "segmenter, and the segmenter draws the same initial weights and batches for the same seed: an ablation "
             "of a classifier part (Inception) must then give the default's segmentation figures exactly, which "
             "checks that isolation."]
    processors = doc.get("processors", {})
    if len({p for by_seed in processors.values() for p in by_seed.values()}) > 1:
        # Kept arm-seeds may come from several machines (a long comparison is trained a few at a time). The order
        # of floating-point sums differs between processors, which moves one seed by several points: say so.
        by_processor: dict[str, dict[str, list]] = {}
        for k, by_seed in processors.items():
            for seed, processor in by_seed.items():
                by_processor.setdefault(processor, {}).setdefault(k, []).append(seed)
        where = "; ".join(f"{processor}: " + ", ".join(
            f"{ARMS[k][0]} [seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}]"
            for k, seeds in arms.items()) for processor, arms in by_processor.items())
        notes.append("The arm-seeds did not all train on one processor with one thread count. The order of "
                     "floating-point sums differs between them, which alone moves a seed by several points, so arms "
                     f"compared across them differ by that as well as by the arms: {where}.")
    if doc.get("same_as_default"):
        notes.append(f"Not trained separately, being the default model itself: "
                     f"{', '.join(ARMS[k][0] for k in doc['same_as_default'])}.")
    # The options that train at this run's size again: --quick for the CPU-sized mode, --profile for a profile's.
    size = {"tiny": " --quick", "quick": " --quick", "full": ""}.get(doc.get("size", "full"),
                                                                      f" --profile {s['run_config']['profile']}")
    otherwise = doc.get("kept_otherwise", {})
    never = [k for k in doc["missing"] if k not in otherwise]
    if never:
        notes.append(f"Not trained yet: {', '.join(never)} (`python -m bench --only joint{size} --arms ...`).")
    if otherwise:
        seeds = sorted({seed for o in otherwise.values() for seed in o["seeds"]})
        notes.append("Kept from an earlier run under other settings, so not shown beside these: " + "; ".join(
            f"{k} [seed{'s' if len(o['seeds']) > 1 else ''} {', '.join(map(str, o['seeds']))}] "
            f"({', '.join(o['differ'])} differ{'s' if len(o['differ']) == 1 else ''})" for k, o in otherwise.items())
            + f" (to train {'them' if len(otherwise) > 1 else 'it'} again: `python -m bench --only joint{size} "
            f"--arms {','.join(otherwise)} --seeds {','.join(map(str, seeds))}`).")
    return notes
