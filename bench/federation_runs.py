"""The federation benchmark's pieces that its simulation side (:mod:`bench.federation`) and its loopback deployment
(:mod:`bench.federation_deployment`) share: the run settings, one model's size in bytes, and what a run folder's
``metrics.json`` says about each round's overhead and bytes."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Context, median, ratio
from braintumnet.config import resolve


def settings(ctx: Context) -> dict:
    tiny_data = {"data.img-size": 32, "data.slices-per-case": 3, "model.feature-size": 8, "train.batch-size": 8}
    if ctx.quick or ctx.tiny:
        s = {"data": tiny_data, "phantom": 0.1, "rounds": 2, "sites": [3, 6], "fractions": [0.5, 1.0],
             "heavy_local_epochs": 10, "deployment": False, "repeat": False}
        if ctx.tiny:
            s["heavy_local_epochs"] = 0
    else:
        s = {"data": {"data.img-size": 64, "data.slices-per-case": 8}, "phantom": 0.25, "rounds": 3,
             "sites": [3, 6, 12, 24], "fractions": [0.5, 1.0], "heavy_local_epochs": 10, "deployment": True,
             "repeat": True}
    # The deployment's heavier run: over 60 s of the slowest site's own work per round at the test size on a quiet
    # 2-core CPU (three sites sharing it); 40 epochs gave 47 s on a busy machine, 80 gave 49 s and 100 gave 56 s on
    # the quiet one. Three rounds, so that the medians (which leave out round 1, the cold start) are over two.
    s["deployment_heavy_epochs"] = 120 if s["heavy_local_epochs"] else 0
    s["deployment_rounds"] = 3
    if ctx.deployment is not None:
        s["deployment"] = ctx.deployment
    if ctx.sites:
        s["sites"] = sorted(set(ctx.sites) | {3})  # 3 sites is every ratio's reference
        # Every dealt site needs a test case: the phantom has about 160 internal test cases per unit of scale.
        s["phantom"] = max(s["phantom"], round(0.01 * max(s["sites"]), 2))
    return s


def model_bytes(run_config: dict) -> int:
    """Bytes of the model's state dict in fp32 (what one copy of the model weighs as arrays)."""
    from braintumnet.data.contract import class_names
    from braintumnet.engine import build_model

    profile = resolve(run_config)
    model = build_model(profile, len(class_names(profile.data.task)))
    return int(sum(v.numel() * 4 for v in model.state_dict().values()))


def analyse(run_dir: Path, size: int, parallel_slots: int) -> dict:
    """Per-round overhead (raw and against this machine's cores) and bytes per site, from ``metrics.json``."""
    doc = json.loads((Path(run_dir) / "metrics.json").read_text())
    rounds = []
    for rec in doc["rounds"]:
        per_site = {site: sum(v.get("seconds", 0.0) for v in phases.values()) for site, phases in rec["sites"].items()}
        phase_work = {phase: max((p.get(phase, {}).get("seconds", 0.0) for p in rec["sites"].values()), default=None)
                      for phase in ("train", "evaluate")}
        wall = rec["seconds"].get("wall_s")
        slowest = max(per_site.values()) if per_site else None
        best_here = max(slowest, sum(per_site.values()) / max(1, min(parallel_slots, len(per_site)))) if per_site \
            else None
        down = [v["down"] for v in rec["bytes_per_site"].values()]
        up = [v["up"] for v in rec["bytes_per_site"].values()]
        rounds.append({
            "round": rec["round"], "wall_s": wall, "slowest_site_s": slowest, "overhead": rec.get("overhead"),
            "overhead_vs_cores": ratio(wall, best_here), "sites": len(per_site),
            "site_seconds": per_site, "train_s": rec["seconds"].get("train_s"),
            "evaluate_s": rec["seconds"].get("evaluate_s"),
            "slowest_train_s": phase_work["train"], "slowest_evaluate_s": phase_work["evaluate"],
            "bytes_down_per_site": median(down) if down else None, "bytes_up_per_site": median(up) if up else None,
            "up_vs_1x_model": ratio(median(up), size) if up else None,
            "exchanged_vs_2x_model": ratio(median([d + u for d, u in zip(down, up)]), 2 * size) if down else None,
            "bytes_spread": (max(down) - min(down)) if down else None,
        })
    later = rounds[1:] or rounds  # round 1 pays the ClientApps' cold start
    return {"rounds": rounds,
            "overhead_median": median([r["overhead"] for r in later]),
            "overhead_vs_cores_median": median([r["overhead_vs_cores"] for r in later]),
            "overhead_round1": rounds[0]["overhead"] if rounds else None,
            "round_wall_s_total": sum(r["wall_s"] for r in rounds),
            "round_wall_s_median_later": median([r["wall_s"] for r in later]),
            "up_vs_1x_model": median([r["up_vs_1x_model"] for r in rounds]),
            # rounds before the last (a round's own cost) and the whole run (the final evaluation included)
            "exchanged_vs_2x_model": median([r["exchanged_vs_2x_model"] for r in (rounds[:-1] or rounds)]),
            "exchanged_vs_2x_model_run": (sum(r["exchanged_vs_2x_model"] or 0 for r in rounds) / len(rounds)
                                          if rounds else None)}
