"""Metrics over repetitions of a training (seeds, cross-validation folds): the mean ± sd every table shows.

A metric that is undefined in some repetitions (NaN or None, e.g. the AUC of a test split that lacks a class) is left
out of its mean and sd rather than making them NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


def mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    """The mean and the sample sd (n - 1) of the defined ``values``, and how many there are.

    Returns:
        ``(mean, sd, n)``: ``(nan, nan, 0)`` when none is defined, sd 0.0 for a single value.
    """
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return math.nan, math.nan, 0
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept)


def mean_sd_tree(repetitions: Sequence[Mapping]) -> tuple[dict, dict]:
    """Nested metric dicts of several repetitions (e.g. ``{"internal_test": {"acc": 0.8}, "per_site": {...}}``)
    reduced leaf by leaf: the tree of means and the tree of sds (see :func:`mean_sd`). The first repetition's keys
    give the shape; a key some repetitions lack is reduced over those that have it."""
    def walk(nodes: list, pick: int) -> dict | float:
        if isinstance(nodes[0], Mapping):
            return {k: walk([n[k] for n in nodes if k in n], pick) for k in nodes[0]}
        return mean_sd(nodes)[pick]
    reps = list(repetitions)
    return walk(reps, 0), walk(reps, 1)


def mean_sd_columns(rows: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Flat metric dicts of several repetitions as ``{metric: {"mean": m, "sd": s}}``, for every metric that is a
    number in every row (counts, lists and flags are left out)."""
    numeric = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                         for r in rows)]
    return {k: dict(zip(("mean", "sd"), mean_sd(r[k] for r in rows)[:2])) for k in numeric}
