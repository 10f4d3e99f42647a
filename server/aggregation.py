"""How the centre aggregates, beside the robust rules of ``server/robust.py``: Flower's FedAvg arguments, metrics
averaged over the sites where they are defined, and arrays given their initial dtypes back.

- **Undefined metrics** (NaN, e.g. AUC on a one-class test split) are averaged over the sites where they are defined.
- Per-site timings and privacy figures (``braintumnet.protocol.NOT_AVERAGED``) are not averaged: each site's own is
  recorded per site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from braintumnet.protocol import ARRAYS, CONFIG, NOT_AVERAGED, WEIGHT_KEY


def fedavg_arguments(profile) -> dict[str, Any]:
    """Flower's FedAvg keyword arguments from the profile (every strategy here passes them on to FedAvg)."""
    fed = profile.federation
    return dict(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                min_train_nodes=fed.min_train_nodes, min_evaluate_nodes=fed.min_evaluate_nodes,
                min_available_nodes=fed.min_available_nodes, weighted_by_key=WEIGHT_KEY, arrayrecord_key=ARRAYS,
                configrecord_key=CONFIG, train_metrics_aggr_fn=nan_weighted_mean,
                evaluate_metrics_aggr_fn=nan_weighted_mean)


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Per metric, the ``weight_key``-weighted mean over the replies where it is finite (NaN where none is)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    keys: list[str] = []
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or key in NOT_AVERAGED or isinstance(value, list):
                continue
            if key not in sums:
                keys.append(key)
                sums[key], weights[key] = 0.0, 0.0
            if math.isfinite(float(value)):
                sums[key] += w * float(value)
                weights[key] += w
    return MetricRecord({k: (sums[k] / weights[k] if weights[k] > 0 else math.nan) for k in keys})


def cast_like(arrays: ArrayRecord, dtypes: Mapping[str, np.dtype]) -> ArrayRecord:
    """FedAvg's mean is float64 for integer buffers: give every array its initial dtype back, in the initial key order
    (FedAvgM pairs the global model's arrays with the aggregate's by position)."""
    out = {}
    for key in [k for k in dtypes if k in arrays] + [k for k in arrays if k not in dtypes]:
        values = arrays[key].numpy()
        dtype = dtypes.get(key, values.dtype)
        if dtype.kind in "iu" and values.dtype.kind == "f":
            values = np.rint(values)
        out[key] = Array(np.asarray(values, dtype=dtype))  # asarray: ufuncs turn 0-d arrays into scalars
    return ArrayRecord(out)
