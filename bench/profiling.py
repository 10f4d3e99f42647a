"""Where BrainTumNet's forward time goes, by forward hooks: its attention layers (:func:`attention_profile`, which
the compute and GPU benchmarks use to time sparse against dense attention) and its top-level parts
(:func:`part_profile`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench.common import median, sync
from braintumnet.model.blocks.attention import AdaptiveMaskedAttention, SelfAttention


def attention_profile(model: nn.Module, x: torch.Tensor, reps: int, device: str) -> dict:
    """Seconds per inference in the whole model, in the BT Blocks' adaptive masked attention, in its global branch
    and in the plain self-attention layers (forward hooks; medians)."""
    spent: dict[str, float] = {}
    handles, originals = [], []

    def timer(key: str):
        def pre(*_):
            spent.setdefault("_start_" + key, []).append(time.perf_counter())

        def post(*_):
            sync(device)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - spent["_start_" + key].pop()
        return pre, post

    for module in model.modules():
        key = ("masked_attention" if isinstance(module, AdaptiveMaskedAttention)
               else "self_attention" if isinstance(module, SelfAttention) else None)
        if key:
            pre, post = timer(key)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        if isinstance(module, AdaptiveMaskedAttention):
            original = module.global_attention

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                out = _original(*args, **kwargs)
                spent["global_branch"] = spent.get("global_branch", 0.0) + time.perf_counter() - start
                return out
            module.global_attention = timed
            originals.append(module)
    results: dict[str, list[float]] = {}
    model.eval()
    try:
        with torch.no_grad():
            model(x)
            for _ in range(reps):
                spent.clear()
                start = time.perf_counter()
                model(x)
                total = time.perf_counter() - start
                for key in ("masked_attention", "global_branch", "self_attention"):
                    results.setdefault(key, []).append(spent.get(key, 0.0))
                results.setdefault("total", []).append(total)
    finally:
        for h in handles:
            h.remove()
        for module in originals:
            del module.global_attention
    return {k: median(v) for k, v in results.items()}


def part_profile(model: nn.Module, x: torch.Tensor, reps: int, device: str) -> dict[str, float]:
    """Share of BrainTumNet's forward time (training mode, so the same graph as a training step) spent in each of
    its top-level parts (``enc1`` ... ``pyramid``, ``classifier``), by forward hooks; medians."""
    spent: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_children():
        def pre(*_, name=name):
            sync(device)
            starts[name] = time.perf_counter()

        def post(*_, name=name):
            sync(device)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - starts[name]
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    shares: dict[str, list[float]] = {}
    model.train()
    try:
        for _ in range(reps):
            spent.clear()
            sync(device)
            start = time.perf_counter()
            model(x)
            sync(device)
            total = time.perf_counter() - start
            for name, seconds in spent.items():
                shares.setdefault(name, []).append(seconds / total)
    finally:
        for h in handles:
            h.remove()
    return {name: median(v) for name, v in shares.items()}
