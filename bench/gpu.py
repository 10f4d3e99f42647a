"""The GPU script: on one H100-class GPU, within 8 minutes, the model-compute benchmark at the
paper's width and a short ``paper``-profile training on CUDA, printing slices per second, GPU memory and the
projected time of the paper's full schedule.

``python -m bench --only gpu --device cuda``. Steps, with their budgets on an H100:

1. compute benchmark, ``paper`` width only (256 px, batch 16, 20 interleaved repetitions): BrainTumNet against
   BasicUNet, DynUNet (nnU-Net), SwinUNETR, and sparse against dense attention (about 2 minutes);
2. a small phantom cohort generated on the spot (about 30 cases, one process per core) and prepared at 256 px with
   20 slices per case (CPU-bound: about 1-2 minutes);
3. ``paper``-profile training (feature size 32, batch 16, AMP) for about 2 minutes of whole epochs:
   slices per second, ``torch.cuda.max_memory_allocated``, and the projected time of the paper's schedule
   (250 epochs over 376 training cases × 20 slices), training only.

Without a GPU it writes ``gpu.json`` / ``gpu.md`` saying it was not run, and why.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from bench.common import Context, table, write_result

PAPER_TRAIN_SLICES = 376 * 20  # the paper's training cases (plan.py: 485 - 109 test) × 20 slices
PAPER_EPOCHS = 250
TRAIN_BUDGET_S = 120.0
PHANTOM_SCALE = 0.06  # ~30 cases over the four sites


def run(ctx: Context) -> dict:
    if not ctx.device.startswith("cuda"):
        doc = {"run": False, "reason": "no CUDA GPU on this machine (none was lent to this task); run "
                                       "`python -m bench --only gpu --device cuda` on an H100-class GPU"}
        ctx.say("gpu: not run (no CUDA device)")
        return write_result(ctx, "gpu", "GPU: model compute and a short paper-profile training", doc,
                            [("Status", [f"Not run: {doc['reason']}."])])
    started = time.perf_counter()
    from bench import compute

    settings = compute.settings_for(ctx)
    settings["widths"] = {"paper": settings["widths"]["paper"]}
    settings["sparse_widths"] = ["paper"]
    ctx.say("gpu: compute benchmark at the paper's width")
    widths = {"paper": compute.compare_models(ctx, "paper", settings["widths"]["paper"], settings["batch"]["paper"],
                                              settings["reps"], True)}
    sparse_speed = _sparse_speed(ctx)
    compute_s = time.perf_counter() - started
    training = _paper_training(ctx)
    doc = {"run": True, "compute": widths, "sparse_vs_dense": sparse_speed, "training": training,
           "compute_s": compute_s, "total_s": time.perf_counter() - started}
    t = training
    print(f"GPU {torch.cuda.get_device_name(0)}: paper-profile training {t['slices_per_s']:.1f} slices/s, "
          f"max memory allocated {t['max_memory_gib']:.2f} GiB; projected full schedule ({PAPER_EPOCHS} epochs × "
          f"{PAPER_TRAIN_SLICES} slices) {t['projected_full_schedule_h']:.2f} h", flush=True)
    for name, r in widths["paper"]["models"].items():
        print(f"  {name}: train {r['train_slices_s']:.1f} slices/s, inference {r['infer_slices_s']:.1f} slices/s, "
              f"train peak {r.get('train_peak_mib', float('nan')):.0f} MiB", flush=True)
    return write_result(ctx, "gpu", "GPU: model compute and a short paper-profile training", doc, _sections(doc))


def _sparse_speed(ctx: Context) -> dict:
    """Sparse against dense inference at 256 px, paper width, random weights (speed only)."""
    from bench import models
    from bench.common import interleaved, median
    from bench.profiling import attention_profile

    net = models.braintumnet(**models.width_settings("paper")).to(ctx.device).eval()
    x = torch.rand(16, 1, 256, 256, device=ctx.device)

    def step(sparse: bool):
        net.set_sparse_attention(sparse)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            net(x)
    times = interleaved({"dense": lambda: step(False), "sparse": lambda: step(True)}, 20, device=ctx.device)
    with torch.autocast("cuda", dtype=torch.float16):  # the global branch itself, the part top-k changes
        branch = {mode: attention_profile(net.set_sparse_attention(sparse), x, 10, ctx.device)["global_branch"]
                  for mode, sparse in (("dense", False), ("sparse", True))}
    net.set_sparse_attention(False)
    return {"dense_slices_s": 16 / median(times["dense"]), "sparse_slices_s": 16 / median(times["sparse"]),
            "speedup": median(times["dense"]) / median(times["sparse"]),
            "attention_speedup": branch["dense"] / branch["sparse"] if branch["sparse"] else None}


def _paper_training(ctx: Context) -> dict:
    from braintumnet.config import resolve
    from braintumnet.data.contract import SITES
    from braintumnet.data.loading import default_cache_root
    from braintumnet.data.prepare import prepare_site
    from braintumnet.data.cache import load_prepared
    from braintumnet.engine import build_model, train_model

    profile = resolve({"profile": "paper"})
    # The paper profile loads and augments in the training process (num_workers 0); at 256 px on a GPU that
    # starves it, so this script gives the loader worker processes (recorded in the result).
    loader_workers = max(1, min((os.cpu_count() or 2) - 2, 8))
    profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, num_workers=loader_workers))
    t0 = time.perf_counter()
    cohort = ctx.phantom(PHANTOM_SCALE, workers=min(os.cpu_count() or 1, 16))
    cache = ctx.workdir / "cache"
    workers = max(1, min(os.cpu_count() or 1, 16))
    sites = [load_prepared(prepare_site(cohort.out / s, cache, profile.data, progress=False, workers=workers).cache_dir)
             for s in SITES]
    data_s = time.perf_counter() - t0
    device = torch.device(ctx.device)
    model = build_model(profile)
    torch.cuda.reset_peak_memory_stats()
    # One epoch first to time it, then as many whole epochs as fit the budget.
    t1 = time.perf_counter()
    stats = train_model(model, sites, profile, device, epochs=1, total_epochs=PAPER_EPOCHS, progress=False)
    torch.cuda.synchronize()
    first = time.perf_counter() - t1
    more = max(0, int((TRAIN_BUDGET_S - first) // max(first, 1e-3)))
    t2 = time.perf_counter()
    if more:
        train_model(model, sites, profile, device, epochs=more, epoch_offset=1, total_epochs=PAPER_EPOCHS,
                    progress=False)
        torch.cuda.synchronize()
    steady = time.perf_counter() - t2
    slices = stats["num-examples"]
    per_s = slices * more / steady if more else slices / first
    return {"cases": int(sum(s.slices["case_id"].nunique() for s in sites)), "train_slices_per_epoch": slices,
            "data_prep_s": data_s, "first_epoch_s": first, "epochs_timed": more, "timed_s": steady,
            "slices_per_s": per_s, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "projected_full_schedule_h": PAPER_EPOCHS * PAPER_TRAIN_SLICES / per_s / 3600,
            "batch_size": profile.train.batch_size, "amp": profile.train.amp, "loader_workers": loader_workers,
            "cache_root_default": str(default_cache_root())}


def _sections(doc: dict) -> list[tuple[str, list[str]]]:
    from bench import compute

    sections = compute.sections({"widths": doc["compute"], "sparse_vs_dense": None, "aims": {}},
                                sparse=False)
    t = doc["training"]
    sections.append(("Paper-profile training on CUDA", table(
        ["cases", "slices/epoch", "data prep s", "first epoch s", "epochs timed", "slices/s", "max memory GiB",
         "projected 250 epochs (h)"],
        [[t["cases"], t["train_slices_per_epoch"], t["data_prep_s"], t["first_epoch_s"], t["epochs_timed"],
          t["slices_per_s"], t["max_memory_gib"], t["projected_full_schedule_h"]]])))
    s = doc["sparse_vs_dense"]
    sections.append(("Sparse against dense attention, paper width, 256 px, batch 16, AMP", table(
        ["dense slices/s", "sparse slices/s", "whole model sparse / dense", "attention (global branch) sparse / dense"],
        [[s["dense_slices_s"], s["sparse_slices_s"], s["speedup"], s.get("attention_speedup")]])))
    return sections
