"""The centre's defences against a bad update: the update-norm bound with clipping, the weight cap and robust
aggregation (docs/federation.md, "Screening the sites' replies").

- **Update-norm bound, per parameter group, with clipping.** A site's update is ``w_site - w_global``. It is split
  into parameter groups, the model's top-level modules (the first part of a state-dict key: ``enc1`` .. ``enc4``,
  ``bottleneck``, ``dec4`` .. ``dec1``, ``pyramid``, ``classifier``), and each group's L2 norm over its floating-point
  arrays is held against a bound, ``robust.norm-factor`` x that group's reference norm. A group above its bound is
  scaled down onto it (clipped), not dropped: a scaled or runaway update keeps its direction and loses its excess, an
  honest site with an unusual round still counts. Per group, because a whole-model norm hides an update concentrated
  in a small module: the classifier head holds under a tenth of the weights, so 10x the median there barely moves
  the whole model's norm. Only an update whose norm is not finite is rejected.
- **The reference norm.** With three or more replies, the lower median of the round's norms for that group (the
  middle value; of an even count the smaller middle one, so half the replies cannot raise it). With one or two there
  is no median worth the name (with two, the outlier is half of it), so the reference is carried: the lower median of
  the group's accepted (clipped) norms over the last ``CARRY_ROUNDS`` aggregated rounds. Honest update norms shrink
  as training converges and the learning rate decays, so a carried reference errs on the generous side. Before any
  round was aggregated (round 1 with one or two replies, or the first round after a resume) there is none, and the
  updates are not bounded that round (logged; a documented limit).
- **Aggregation.** ``fedavg`` is Flower's weighted mean (``aggregate_arrayrecords``). ``median`` (coordinate-wise,
  as Flower's ``FedMedian``) and ``trimmed-mean`` (Flower's ``fedtrimmedavg.trim_mean``) are unweighted: a site's
  size must not buy it influence when the point is robustness. A rule that cannot do what it is for with the replies
  it has (:func:`rule_shortfall`) is refused for that round rather than quietly averaging.
- **Weight cap.** FedAvg weights a site by the ``num-examples`` it reports, which nothing at the centre can check: one
  site claiming 1e12 slices would make the aggregate its own model. With three or more replies no site may carry more
  than ``robust.max-weight-share`` of the total weight (:func:`weight_cap`); the weights above the cap are clipped to
  it. With two sites a share cap would turn every honest 3:1 federation into a plain mean, so it is not applied
  (documented as a limit).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

MIN_SITES_FOR_NORM_BOUND = 3
MIN_SITES_FOR_WEIGHT_CAP = 3
CARRY_ROUNDS = 5  # aggregated rounds whose accepted norms make the reference of a round with one or two replies

GroupNorms = dict[str, float]  # parameter group -> L2 norm of its update


def parameter_group(key: str) -> str:
    """A state-dict key's parameter group: the model's top-level module (``classifier.fc.weight`` -> ``classifier``)."""
    return key.split(".", 1)[0]


def group_norms(arrays: ArrayRecord, reference: ArrayRecord) -> GroupNorms:
    """Per parameter group, the L2 norm of ``arrays - reference`` over its floating-point arrays (integer buffers are
    counters, not weights)."""
    squares: dict[str, float] = {}
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind != "f":
            continue
        diff = (values.astype(np.float64) - reference[key].numpy().astype(np.float64)).ravel()
        group = parameter_group(key)
        squares[group] = squares.get(group, 0.0) + float(np.dot(diff, diff))
    return {group: math.sqrt(total) for group, total in squares.items()}


def whole_norm(norms: Mapping[str, float]) -> float:
    """The whole update's L2 norm from its groups' norms."""
    return math.sqrt(sum(n * n for n in norms.values()))


def lower_median(values: Sequence[float]) -> float:
    """The middle value; of an even count the smaller middle one (so half the values cannot raise it)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class NormBounds:
    """One round's update-norm bound per parameter group, and where its reference came from (for logs and
    ``metrics.json``)."""

    factor: float
    source: str
    groups: dict[str, float]

    def scales(self, norms: Mapping[str, float]) -> dict[str, float]:
        """The groups of an update above their bound, each with the factor that scales it onto the bound."""
        return {g: self.groups[g] / n for g, n in norms.items() if g in self.groups and n > self.groups[g]}

    def public(self) -> dict:
        return {"factor": self.factor, "reference": self.source, "groups": dict(self.groups)}


class NormReference:
    """The reference norms the bound scales, per parameter group: the round's own with three or more replies, else the
    accepted norms carried from the last ``rounds`` aggregated rounds."""

    def __init__(self, rounds: int = CARRY_ROUNDS):
        self._past: deque[dict[str, list[float]]] = deque(maxlen=rounds)

    def bounds(self, norms: Sequence[Mapping[str, float]], factor: float) -> NormBounds | None:
        """The round's bounds for the updates' ``norms``; None when the bound is off (``factor`` 0) or there is no
        reference (one or two replies and no round aggregated before)."""
        if factor <= 0 or not norms:
            return None
        if len(norms) >= MIN_SITES_FOR_NORM_BOUND:
            per_group = _by_group(norms)
            source = f"the lower median of this round's {len(norms)} replies"
        else:
            per_group = {}
            for past in self._past:
                for group, values in past.items():
                    per_group.setdefault(group, []).extend(values)
            if not per_group:
                return None
            source = (f"the lower median of the norms accepted over the last {len(self._past)} aggregated round(s) "
                      f"(this round has {len(norms)} repl{'y' if len(norms) == 1 else 'ies'})")
        return NormBounds(factor, source, {g: factor * lower_median(v) for g, v in per_group.items()})

    def accept(self, norms: Iterable[Mapping[str, float]]) -> None:
        """The accepted (clipped) norms of a round that was aggregated."""
        entry = _by_group(norms)
        if entry:
            self._past.append(entry)


def _by_group(norms: Iterable[Mapping[str, float]]) -> dict[str, list[float]]:
    """Group -> its norm in each update."""
    out: dict[str, list[float]] = {}
    for update in norms:
        for group, value in update.items():
            out.setdefault(group, []).append(value)
    return out


def clip_update(arrays: ArrayRecord, reference: ArrayRecord, scales: Mapping[str, float]) -> ArrayRecord:
    """``arrays`` with the update of each group in ``scales`` scaled by its factor (``reference + s x update``), each
    array in its own dtype; the other arrays as they were."""
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        scale = scales.get(parameter_group(key))
        if scale is not None and values.dtype.kind == "f":
            ref = reference[key].numpy().astype(np.float64)
            values = np.asarray(ref + scale * (values.astype(np.float64) - ref), dtype=values.dtype)
        out[key] = Array(np.asarray(values))
    return ArrayRecord(out)


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
                f"{n} replies (it needs {needed} or more; strategy.trim-fraction 0.34 trims one of three): the "
                "aggregate would be their plain unweighted mean")
    if rule == "median" and n < 3:
        return (f"strategy.aggregation median of {n} repl{'y' if n == 1 else 'ies'} would be their plain unweighted "
                "mean (it needs 3 or more)")
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
