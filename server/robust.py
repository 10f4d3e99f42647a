"""The centre's defences against a bad update: the update-norm bound and robust aggregation (docs/privacy.md).

- **Norm bound.** A site's update is ``w_site - w_global``; its L2 norm over every floating-point array is compared
  with the round's median update norm. One far above the others (``> robust.norm-factor × median``) is rejected: a
  scaled or runaway update, whether a bug, a diverged site or an attack. The median needs three or more updates to
  mean anything (with two, it is their mean, which the outlier itself inflates), so the bound is not applied to
  fewer; documented as a limit.
- **Aggregation.** ``fedavg`` is Flower's weighted mean (``aggregate_arrayrecords``). ``median`` (coordinate-wise,
  as Flower's ``FedMedian``) and ``trimmed-mean`` (Flower's ``fedtrimmedavg.trim_mean``) are unweighted: a site's
  size must not buy it influence when the point is robustness.
- **Weight cap.** FedAvg weights a site by the ``num-examples`` it reports, which nothing at the centre can check: one
  site claiming 1e12 slices would make the aggregate its own model. With three or more replies no site may carry more
  than ``robust.max-weight-share`` of the total weight (:func:`weight_cap`); the weights above the cap are clipped to
  it. With two sites a share cap would turn every honest 3:1 federation into a plain mean, so it is not applied
  (documented as a limit, like the norm bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

MIN_SITES_FOR_NORM_BOUND = 3
MIN_SITES_FOR_WEIGHT_CAP = 3


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over the floating-point arrays (integer buffers are counters)."""
    total = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind != "f":
            continue
        diff = values.astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def norm_outliers(norms: dict[str, float], factor: float) -> dict[str, str]:
    """Sites whose update norm exceeds ``factor`` × the median, with the reason; none if off or too few sites."""
    if factor <= 0 or len(norms) < MIN_SITES_FOR_NORM_BOUND:
        return {}
    median = float(np.median(list(norms.values())))
    bound = factor * median
    return {site: (f"update norm {norm:.4g} exceeds robust.norm-factor {factor:g} x the median update norm "
                   f"{median:.4g} of {len(norms)} sites")
            for site, norm in norms.items() if norm > bound}


def weight_cap(weights: Sequence[float], share: float) -> float | None:
    """The weight no site may exceed so that none carries more than ``share`` of the clipped total, or None where
    nothing is clipped (``share`` 0, fewer than three sites, or no site above its share).

    Water-filling: the k largest weights are clipped to one cap ``c`` with ``c = share × (k × c + the rest)``; the
    smallest k for which ``c`` lies between the k-th and (k+1)-th largest weight is the answer. Where ``share`` is
    below 1 / the number of sites no cap satisfies it, and every weight becomes the smallest (equal weights).
    """
    if share <= 0 or len(weights) < MIN_SITES_FOR_WEIGHT_CAP or max(weights) <= share * sum(weights):
        return None
    ranked = sorted(weights, reverse=True)
    for k in range(1, len(ranked)):
        if share * k >= 1:
            break
        cap = share * sum(ranked[k:]) / (1 - share * k)
        if ranked[k] <= cap <= ranked[k - 1]:
            return cap
    return ranked[-1]


def rule_shortfall(rule: str, n: int, trim_fraction: float) -> str | None:
    """Why ``strategy.aggregation`` cannot do what it is for with ``n`` replies, or None if it can."""
    if rule == "trimmed-mean" and trim_fraction > 0 and int(trim_fraction * n) == 0:
        needed = math.ceil(1 / trim_fraction - 1e-9)
        return (f"strategy.aggregation trimmed-mean with strategy.trim-fraction {trim_fraction:g} trims no site of "
                f"{n} replies (it needs {needed} or more): the aggregate is their plain unweighted mean")
    if rule == "median" and n < 3:
        return f"strategy.aggregation median of {n} replies is their plain unweighted mean"
    return None


def aggregate(contents: Sequence[RecordDict], rule: str, weight_key: str, trim_fraction: float) -> ArrayRecord:
    """The new global arrays from the kept train replies by ``strategy.aggregation``."""
    if rule == "fedavg":
        return aggregate_arrayrecords(list(contents), weight_key)
    records = [next(iter(c.array_records.values())) for c in contents]
    out = {}
    for key in records[0]:
        stacked = np.stack([r[key].numpy() for r in records])
        if rule == "median":
            value = np.median(stacked, axis=0)
        elif rule == "trimmed-mean":
            value = trim_mean(stacked, trim_fraction)
        else:
            raise ValueError(f"strategy.aggregation={rule!r}: use fedavg, median or trimmed-mean")
        out[key] = Array(np.asarray(value))
    return ArrayRecord(out)
