"""Model compute: training and inference slices per second and peak memory of BrainTumNet at the
``quick`` and ``paper`` widths against MONAI's BasicUNet, DynUNet (nnU-Net) and SwinUNETR (2-D) at the same input
size and batch; and BrainTumNet's sparse (top-k) attention against dense attention at inference.

Throughput: the models' steps take turns within one process (``bench.common.interleaved``), medians over the
repetitions; a training step is forward, loss (BrainTumNet: DiceCE + 0.7 CE; baselines: the same DiceCE), backward
and an Adam step. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the resident
set's high-water mark (``getrusage`` ``ru_maxrss``) over the built model, in a fresh forked process per model
(tracemalloc does not see torch's allocator).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import resource
import time
from typing import Callable

import torch
from torch import nn

from bench import models
from bench.common import Context, fmt, interleaved, median, ratio, table, write_result
from bench.profiling import attention_profile, part_profile
from braintumnet.losses import MultiTaskLoss

REFERENCE = "BrainTumNet"


def settings_for(ctx: Context) -> dict:
    """Batch, repetitions and widths for the run's mode and device."""
    if ctx.tiny:
        return {"widths": {"quick": {"feature_size": 8, "num_heads": 2, "img_size": 32}}, "batch": {"quick": 2},
                "reps": 1, "sparse_size": 32, "sparse_widths": ["quick"], "train_epochs": 1, "phantom": 0.03,
                "sparse_slices": 3, "memory": False}
    cuda = ctx.device.startswith("cuda")
    return {
        "widths": {w: models.width_settings(w) for w in ("quick", "paper")},
        # CPU: 16 slices at 64 px, but 2 (quick) or 4 at 256 px, where one step of the largest network takes seconds.
        "batch": {"quick": 16, "paper": 16 if cuda else (2 if ctx.quick else 4)},
        "reps": 20 if cuda else (3 if ctx.quick else 7),
        "sparse_size": 256,
        "sparse_widths": ["quick", "paper"],
        "train_epochs": 3 if ctx.quick else 6,
        "phantom": 0.03 if ctx.quick else 0.06,
        "sparse_slices": 4 if ctx.quick else 8,
        "memory": True,
    }


def build(name: str, width: dict) -> nn.Module:
    """One model by name (also called in the memory worker, which rebuilds it from the same arguments)."""
    if name == REFERENCE:
        return models.braintumnet(**width)
    if name.startswith("SwinUNETR fs"):
        return models.swin_unetr(int(name.removeprefix("SwinUNETR fs")))
    if name == "BasicUNet":
        return models.basic_unet(width["feature_size"])
    if name == "DynUNet (nnU-Net)":
        return models.dyn_unet(width["feature_size"], width["img_size"])
    raise ValueError(f"unknown model {name!r}")


def _train_step(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = MultiTaskLoss()

    def step() -> None:
        model.train()
        out = model(x)
        loss = criterion(out.seg_logits.float(), mask, out.cls_logits.float(), label).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return step


def _inputs(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=g).to(device)
    mask = torch.randint(0, 3, (batch, 1, size, size), generator=g).to(device)
    label = torch.randint(0, 3, (batch,), generator=g).to(device)
    return x, mask, label


def _memory_worker(name: str, width: dict, target: int | None, batch: int, queue) -> None:
    """In a fresh forked process: growth of the peak RSS over the built model, inference first, then training."""
    torch.set_num_threads(1)
    try:
        model = build(name, width)
        x, mask, label = _inputs(batch, width["img_size"], "cpu")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _infer_step(model, x)()
        infer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _train_step(model, x, mask, label)()
        train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        queue.put({"infer_peak_mib": (infer - base) / 1024, "train_peak_mib": (train - base) / 1024})
    except Exception as exc:  # reported in the table, not fatal
        queue.put({"error": f"{type(exc).__name__}: {exc}"[:300]})


def _memory_cpu(names: list[str], width: dict, target: int, batch: int) -> dict[str, dict]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "monai.networks.nets", "braintumnet.model", "bench.models"])
    found = {}
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_worker, args=(name, width, target, batch, queue))
        proc.start()
        try:
            found[name] = queue.get(timeout=900)
        except Exception as exc:
            found[name] = {"error": f"no answer from the memory worker: {type(exc).__name__}"}
        proc.join(30)
    return found


def _memory_cuda(model: nn.Module, x, mask, label) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _infer_step(model, x)()
    infer = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    _train_step(model, x, mask, label)()
    train = torch.cuda.max_memory_allocated() - base
    return {"infer_peak_mib": infer / 2**20, "train_peak_mib": train / 2**20}


def compare_models(ctx: Context, width_name: str, width: dict, batch: int, reps: int, memory: bool) -> dict:
    """Every model of one width: parameters, slices/s (train, inference), peak memory, ratios to BrainTumNet."""
    device = ctx.device
    reference = models.braintumnet(**width)
    target = models.params(reference)
    names = [REFERENCE, *models.segmentation_baselines(width["feature_size"], width["img_size"],
                                                       target_params=target)]
    if ctx.tiny:
        names = names[:2]
    mem = _memory_cpu(names, width, target, batch) if memory and device == "cpu" else {}
    built = {n: (reference if n == REFERENCE else build(n, width)).to(device) for n in names}
    x, mask, label = _inputs(batch, width["img_size"], device)
    if memory and device.startswith("cuda"):
        mem = {n: _memory_cuda(m, x, mask, label) for n, m in built.items()}
    ctx.say(f"compute {width_name}: {len(names)} models at {width['img_size']} px, batch {batch}, {reps} reps")
    train = interleaved({n: _train_step(m, x, mask, label) for n, m in built.items()}, reps, device=device)
    infer = interleaved({n: _infer_step(m, x) for n, m in built.items()}, max(reps, 3), device=device)
    rows = {}
    for n, m in built.items():
        rows[n] = {"params": models.params(m), "train_slices_s": batch / median(train[n]),
                   "infer_slices_s": batch / median(infer[n]), "train_step_s": train[n], "infer_step_s": infer[n],
                   **mem.get(n, {})}
    rows[REFERENCE]["forward_share_by_part"] = part_profile(built[REFERENCE], x, max(1, min(reps, 3)), device)
    ref = rows[REFERENCE]
    for r in rows.values():
        r["params_ratio"] = ratio(r["params"], ref["params"])
        r["train_ratio"] = ratio(ref["train_slices_s"], r["train_slices_s"])  # BrainTumNet / model: >1 = faster
        r["infer_ratio"] = ratio(ref["infer_slices_s"], r["infer_slices_s"])
        r["train_mem_ratio"] = ratio(ref.get("train_peak_mib"), r.get("train_peak_mib"))
    del built
    return {"width": width_name, **width, "batch": batch, "reps": reps, "models": rows}


# ---- sparse (top-k) against dense attention ------------------------------------------------------------------------


def _trained_quick_model(ctx: Context, settings: dict):
    """A quick-width BrainTumNet trained briefly at the sparse benchmark's size, and its prepared sites."""
    from braintumnet.config import resolve
    from braintumnet.data.contract import SITES
    from braintumnet.data.loading import load_sites
    from braintumnet.engine import train_model

    size = settings["sparse_size"]
    profile = resolve({"profile": "quick", "data.img-size": size, "data.slices-per-case": settings["sparse_slices"]})
    profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, batch_size=8))
    phantom = ctx.phantom(settings["phantom"]).out
    sites = load_sites([phantom / s for s in SITES], ctx.cache, profile.data, progress=False)
    model = models.braintumnet(**{**models.width_settings("quick"), "img_size": size})
    t0 = time.perf_counter()
    stats = train_model(model, sites, profile, torch.device(ctx.device), epochs=settings["train_epochs"],
                        progress=False)
    return model, sites, profile, {"epochs": settings["train_epochs"], "train_slices": stats["num-examples"],
                                   "train_s": round(time.perf_counter() - t0, 1), "img_size": size,
                                   "slices_per_case": settings["sparse_slices"],
                                   "phantom_scale": settings["phantom"]}


def sparse_vs_dense(ctx: Context, settings: dict) -> dict:
    """Inference speed of top-k against dense attention (both widths, same weights per width) at ``sparse_size``,
    and the Dice difference of the two modes on one briefly trained quick-width model."""
    from braintumnet.data.dataset import select_slices
    from braintumnet.data.contract import class_names
    from braintumnet.scoring import evaluate_cases, predict_slices

    size, device, reps = settings["sparse_size"], ctx.device, max(settings["reps"], 5 if not ctx.tiny else 1)
    model, sites, profile, training = _trained_quick_model(ctx, settings)
    speed = {}
    for width_name in settings["sparse_widths"]:
        width = {**models.width_settings(width_name), "img_size": size} if not ctx.tiny else settings["widths"]["quick"]
        net = model if width_name == "quick" else models.braintumnet(**width)
        net = net.to(device).eval()
        batch = settings["batch"].get(width_name, 2)
        x = _inputs(batch, size, device)[0]

        def run(sparse: bool, net=net, x=x):
            net.set_sparse_attention(sparse)
            with torch.no_grad():
                net(x)
        times = interleaved({"dense": lambda: run(False), "sparse": lambda: run(True)}, reps, device=device)
        profile_dense = attention_profile(net.set_sparse_attention(False), x, max(1, reps // 2), device)
        profile_sparse = attention_profile(net.set_sparse_attention(True), x, max(1, reps // 2), device)
        net.set_sparse_attention(False)
        dense_s, sparse_s = median(times["dense"]), median(times["sparse"])
        speed[width_name] = {"batch": batch, "params": models.params(net), "dense_slices_s": batch / dense_s,
                             "sparse_slices_s": batch / sparse_s, "speedup": dense_s / sparse_s,
                             # the attention itself: the global branch, the only part top-k changes
                             "attention_speedup": ratio(profile_dense.get("global_branch"),
                                                        profile_sparse.get("global_branch")),
                             "masked_attention_speedup": ratio(profile_dense.get("masked_attention"),
                                                               profile_sparse.get("masked_attention")),
                             "dense_step_s": times["dense"], "sparse_step_s": times["sparse"],
                             "profile_dense_s": profile_dense, "profile_sparse_s": profile_sparse}
    # Dice of the two modes on the same trained weights, pooled internal test split.
    dev = torch.device(device)
    scores, labels = {}, {}
    for mode, sparse in (("dense", False), ("sparse", True)):
        model.set_sparse_attention(sparse)
        scores[mode], _ = evaluate_cases(model, sites, "test", profile, dev, progress=False)
        table_ = select_slices(sites, "test", class_names(profile.data.task))
        # The network's own labels, before any post-processing: the agreement compares the two attention modes'
        # computation (the Dice beside it is scored as every evaluation scores, post-processing included).
        labels[mode] = predict_slices(model, sites, table_, dev, progress=False)
    model.set_sparse_attention(False)
    a, b = labels["dense"][0] == 1, labels["sparse"][0] == 1
    agreement = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)) if (a.sum() + b.sum()) else 1.0
    return {
        "img_size": size, "topk_ratio": models.PROFILES["paper"].model.topk_ratio, "speed": speed,
        "training": training,
        "dice": {mode: {k: scores[mode][k] for k in ("dice_tumor", "dice_edema", "dice_whole", "acc")}
                 for mode in scores},
        "dice_tumor_difference": scores["sparse"]["dice_tumor"] - scores["dense"]["dice_tumor"],
        "tumor_mask_agreement_dice": agreement,
        "pixel_agreement": float((labels["dense"][0] == labels["sparse"][0]).mean()),
        "class_probability_max_abs_diff": float(abs(labels["dense"][1] - labels["sparse"][1]).max()),
    }


def run(ctx: Context) -> dict:
    torch.manual_seed(0)
    if ctx.device == "cpu":
        torch.set_num_threads(1)  # one core per process: stable on a shared 2-core box, stated in the tables
    s = settings_for(ctx)
    widths = {w: compare_models(ctx, w, width, s["batch"][w], s["reps"], s["memory"])
              for w, width in s["widths"].items()}
    ctx.say(f"compute: sparse against dense attention at {s['sparse_size']} px")
    sparse = sparse_vs_dense(ctx, s)
    doc = {"widths": widths, "sparse_vs_dense": sparse, "swin_note": models.swin_available(),
           "aims": _aims(widths, sparse)}
    return write_result(ctx, "compute", "Model compute: BrainTumNet against U-Net, nnU-Net and Swin-UNETR",
                        doc, sections(doc), _notes(ctx))


def _aims(widths: dict, sparse: dict) -> dict:
    aims = {}
    for w, res in widths.items():
        swins = {n: r for n, r in res["models"].items() if n.startswith("SwinUNETR")}
        if swins:
            aims[f"train_vs_swin_{w}"] = {n: {"ratio": r["train_ratio"], "params_ratio": r["params_ratio"],
                                              "met": (r["train_ratio"] or 0) >= 1.0} for n, r in swins.items()}
        below = [r for r in swins.values() if r["params_ratio"] <= 1]
        above = [r for r in swins.values() if r["params_ratio"] > 1]
        if below and above:  # SwinUNETR's throughput at BrainTumNet's parameter count, log-log between the two
            lo, hi = below[-1], above[0]
            f = -math.log(lo["params_ratio"]) / (math.log(hi["params_ratio"]) - math.log(lo["params_ratio"]))
            swin_at = math.exp((1 - f) * math.log(lo["train_slices_s"]) + f * math.log(hi["train_slices_s"]))
            value = res["models"][REFERENCE]["train_slices_s"] / swin_at
            aims[f"train_vs_swin_{w}_at_equal_params"] = {"ratio": value, "swin_slices_s": swin_at,
                                                           "met": value >= 1.0}
    for w, r in sparse["speed"].items():
        aims[f"sparse_attention_speedup_{w}"] = {"ratio": r["attention_speedup"], "aim": 1.3,
                                                 "met": (r["attention_speedup"] or 0) >= 1.3}
        aims[f"sparse_speedup_{w}"] = {"ratio": r["speedup"], "aim": 1.3, "met": r["speedup"] >= 1.3}
    aims["sparse_dice_difference"] = {"value": sparse["dice_tumor_difference"], "aim": 0.01,
                                      "met": abs(sparse["dice_tumor_difference"]) <= 0.01}
    return aims


def _notes(ctx: Context) -> list[str]:
    notes = [f"Throughput: the models' steps interleaved in one process, medians; torch threads "
             f"{torch.get_num_threads()}. Ratios are BrainTumNet / model: above 1, BrainTumNet is faster "
             "(or, for memory, uses less). Parameter counts are stated for every model; BrainTumNet's include its "
             "classifier, the baselines segment only. SwinUNETR's feature_size (a multiple of 12) is chosen to "
             "bracket BrainTumNet's parameter count."]
    if ctx.device == "cpu":
        notes.append("CPU peak memory: growth of the process's peak resident set (ru_maxrss) over the built model "
                     "in a fresh forked process per model: inference first, then one training step (activations, "
                     "gradients, Adam state).")
    if ctx.machine.get("cpus_usable", 0) <= 2 and ctx.device == "cpu":
        notes.append("Measured on a loaded 2-core box shared with other work: absolute figures are noisy and low; "
                     "the ratios are what to read.")
    return notes


def sections(doc: dict, sparse: bool = True) -> list[tuple[str, list[str]]]:
    sections = []
    for w, res in doc["widths"].items():
        head = ["model", "params (M)", "params ratio", "train slices/s", "BTN/model train", "infer slices/s",
                "BTN/model infer", "train peak MiB", "infer peak MiB", "model/BTN train mem"]
        rows = [[n, r["params"] / 1e6, r["params_ratio"], r["train_slices_s"], r["train_ratio"], r["infer_slices_s"],
                 r["infer_ratio"], r.get("train_peak_mib", r.get("error")), r.get("infer_peak_mib"),
                 ratio(r.get("train_peak_mib"), res["models"][REFERENCE].get("train_peak_mib"))]
                for n, r in res["models"].items()]
        sections.append((f"`{w}` width: {res['img_size']}×{res['img_size']} px, batch {res['batch']}, "
                         f"{res['reps']} interleaved repetitions", table(head, rows)))
        parts = {k: v for k, v in (res["models"][REFERENCE].get("forward_share_by_part") or {}).items() if v > 1e-3}
        if parts:
            sections.append((f"Where BrainTumNet's forward pass spends its time, `{w}` width (share of one forward "
                             "in training mode)", table(list(parts), [list(parts.values())])))
    if not sparse:
        return sections
    sp = doc["sparse_vs_dense"]
    head = ["width", "params (M)", "batch", "attention (global branch) sparse / dense speed",
            "masked-attn module sparse / dense", "whole model sparse / dense", "dense slices/s", "sparse slices/s",
            "global-branch share (dense)", "masked-attn share (dense)", "self-attn share (dense)"]
    rows = []
    for w, r in sp["speed"].items():
        p = r["profile_dense_s"]
        rows.append([w, r["params"] / 1e6, r["batch"], r.get("attention_speedup"), r.get("masked_attention_speedup"),
                     r["speedup"], r["dense_slices_s"], r["sparse_slices_s"],
                     ratio(p.get("global_branch"), p.get("total")), ratio(p.get("masked_attention"), p.get("total")),
                     ratio(p.get("self_attention"), p.get("total"))])
    lines = table(head, rows)
    lines += ["", "Top-k changes only the global branch of the BT Blocks' adaptive masked attention (its keys are "
              "gathered, not masked); the local windows, the plain self-attention, the MLPs and the convolutions "
              "are the same in both modes. So the whole model can gain at most the global branch's share of "
              "inference (the share column): the attention's own speed-up is the first ratio, the whole model's "
              "the third."]
    sections.append((f"Sparse (top-k {sp['topk_ratio']}) against dense attention at inference, "
                     f"{sp['img_size']}×{sp['img_size']} px", lines))
    t = sp["training"]
    dice_rows = [[mode, *(v[k] for k in ("dice_tumor", "dice_edema", "dice_whole", "acc"))]
                 for mode, v in sp["dice"].items()]
    lines = table(["mode", "dice_tumor", "dice_edema", "dice_whole", "acc"], dice_rows)
    lines += ["", f"Same weights: a `quick`-width BrainTumNet trained {t['epochs']} epochs on {t['train_slices']} "
              f"slices at {t['img_size']} px ({t['slices_per_case']} per case, phantom scale {t['phantom_scale']}, "
              f"{t['train_s']} s), pooled internal test split. dice_tumor sparse − dense: "
              f"{fmt(sp['dice_tumor_difference'], 4)}; the two modes' tumour masks agree with Dice "
              f"{fmt(sp['tumor_mask_agreement_dice'], 4)}, pixels agree {fmt(sp['pixel_agreement'], 4)}, class "
              f"probabilities differ by at most {fmt(sp['class_probability_max_abs_diff'], 4)}. A briefly trained "
              "model: the difference, not the Dice itself, is the figure."]
    sections.append(("Sparse against dense: segmentation on the same trained weights", lines))
    aims = []
    for key, a in doc["aims"].items():
        if key.endswith("_at_equal_params"):
            aims.append([f"{key} (SwinUNETR interpolated log-log to BrainTumNet's parameters)",
                         "≥ 1.0 (BTN/Swin train)", a["ratio"], a["met"]])
        elif key.startswith("train_vs_swin"):
            for n, v in a.items():
                aims.append([f"{key}: {n}", "≥ 1.0 (BTN/Swin train)", v["ratio"], v["met"]])
        elif key == "sparse_dice_difference":
            aims.append([key, "abs(Δ) ≤ 0.01", a["value"], a["met"]])
        elif key.startswith("sparse_attention_speedup"):
            aims.append([f"{key} (the top-k global branch against the dense one)", "≥ 1.3", a["ratio"], a["met"]])
        else:
            aims.append([f"{key} (the whole model, for scale)", "≥ 1.3", a["ratio"], a["met"]])
    sections.append(("Aims", table(["figure", "aim", "measured", "met"], aims)))
    return sections
