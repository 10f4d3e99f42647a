"""The centre's defences against a bad update: the update-norm bound and robust aggregation (docs/privacy.md).

- **Norm bound.** A site's update is ``w_site - w_global``; its L2 norm over every floating-point array is compared
  with the round's median update norm. One far above the others (``> robust.norm-factor × median``) is rejected: a
  scaled or runaway update, whether a bug, a diverged site or an attack. The median needs three or more updates to
  mean anything (with two, it is their mean, which the outlier itself inflates), so the bound is not applied to
  fewer; documented as a limit.
- **Aggregation.** ``fedavg`` is Flower's weighted mean (``aggregate_arrayrecords``). ``median`` (coordinate-wise,
  as Flower's ``FedMedian``) and ``trimmed-mean`` (Flower's ``fedtrimmedavg.trim_mean``) are unweighted: a site's
  size must not buy it influence when the point is robustness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

MIN_SITES_FOR_NORM_BOUND = 3


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
