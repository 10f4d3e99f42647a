"""What every benchmark shares: its run context, interleaved timing, ratios and the result files."""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from bench.machine import describe, one_line
from braintumnet.io import atomic_write_json

log = logging.getLogger("bench")

SYNTHETIC = ("Accuracy figures come from the synthetic phantom cohort (braintumnet.data.phantom), not from patients; "
             "they compare methods on the same synthetic data and say nothing about clinical performance.")


@dataclass
class Context:
    """One ``python -m bench`` run.

    Args:
        out: where ``<name>.json`` and ``<name>.md`` go.
        workdir: scratch space (phantom cohorts, caches, federated run folders), never inside the repository.
        quick: the few-minutes CPU version of every benchmark.
        device: ``cpu`` or ``cuda`` (resolved from ``auto``).
        tiny: the test suite's size (seconds per benchmark, figures meaningless): checks the pipeline only.
        cache: the prepared-cache root shared by the benchmarks (default ``workdir/cache``).
        deployment: run the federation benchmark's loopback deployment (None: only in full mode).
        sites: the federation benchmark's site counts for the scaling runs (None: the mode's own).
        arms: the accuracy benchmark's arms to train (``bench.accuracy.ARM_KEYS``; None: every one not yet kept).
        fresh: retrain accuracy arms even where a kept result with the same settings exists.
        seeds: the joint-model benchmark's seeds (None: 0, 1, 2).
        profile: the simulation profile whose size the joint-model benchmark trains at in full mode.
    """

    out: Path
    workdir: Path
    quick: bool = True
    device: str = "cpu"
    tiny: bool = False
    machine: dict = field(default_factory=describe)
    cache: Path | None = None
    deployment: bool | None = None
    sites: tuple[int, ...] | None = None
    arms: tuple[str, ...] | None = None
    fresh: bool = False
    seeds: tuple[int, ...] | None = None
    profile: str = "quick"
    _phantoms: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cache = Path(self.cache) if self.cache else self.workdir / "cache"

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def register_phantom(self, summary, scale: float, fmt: str = "nifti", seed: int = 0,
                         test_scale: float | None = None) -> None:
        """Use an existing cohort (anything with ``.out``, e.g. a ``CohortSummary``) for this scale and format."""
        self._phantoms[(scale, fmt, seed, test_scale)] = summary

    def phantom(self, scale: float, fmt: str = "nifti", seed: int = 0, workers: int | None = None,
                test_scale: float | None = None):
        """A phantom cohort of this scale and format, generated once per run (SYNTHETIC); ``test_scale``: test and
        external sets of that larger scale (``generate_cohort``). Returns its summary."""
        from braintumnet.data.phantom import complete_cohort, generate_cohort, held_out_scale

        test_scale = held_out_scale(scale, test_scale)  # the test scale generate_cohort writes and records
        key = (scale, fmt, seed, test_scale)
        if key not in self._phantoms:

            tests = f"-t{test_scale:g}" if test_scale else ""
            root = self.workdir / f"phantom-{fmt}-s{scale:g}{tests}-seed{seed}"
            info = complete_cohort(root) or {}
            if (info.get("scale"), info.get("format"), info.get("seed"), info.get("test_scale")) == key:
                self._phantoms[key] = SimpleNamespace(out=root, seconds=None)  # a kept --workdir: reuse it
            else:
                self._phantoms[key] = generate_cohort(root, scale=scale, seed=seed, fmt=fmt, workers=workers,
                                                      progress=False, test_scale=test_scale)
        return self._phantoms[key]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(steps: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1, device: str = "cpu",
                ) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns (the order rotates every repetition), so that a load
    change on a shared machine hits every step alike. Returns every repetition's time, per step."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing or ``b`` is 0."""
    if a is None or b is None or not b or any(isinstance(v, float) and math.isnan(v) for v in (a, b)):
        return None
    return a / b


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]


def write_result(ctx: Context, name: str, title: str, doc: dict, sections: Sequence[tuple[str, list[str]]],
                 notes: Sequence[str] = ()) -> dict:
    """Write ``<out>/<name>.json`` (the figures, the machine, the mode) and ``<out>/<name>.md`` (the tables).

    ``sections`` are ``(heading, markdown lines)``; ``notes`` are paragraphs shown under the machine line.
    """
    ctx.out.mkdir(parents=True, exist_ok=True)
    machine_end = {**ctx.machine, "load_average_end": list(describe()["load_average"])}
    mode = "tiny (test)" if ctx.tiny else "quick" if ctx.quick else "full"
    document = {"benchmark": name, "mode": mode, "device": ctx.device, "machine": machine_end, **doc}
    atomic_write_json(ctx.out / f"{name}.json", document, default=str)
    md = [f"# {title}", "",
          f"Mode `{mode}` on `{ctx.device}`. Machine: {one_line(ctx.machine)}; load average at the end "
          f"{', '.join(str(x) for x in machine_end['load_average_end'])}.", ""]
    md += [*(f"{n}\n" for n in notes)]
    for heading, lines in sections:
        md += [f"## {heading}", "", *lines, ""]
    (ctx.out / f"{name}.md").write_text("\n".join(md))
    ctx.say(f"{name}: wrote {ctx.out / (name + '.json')} and {name}.md")
    return document
