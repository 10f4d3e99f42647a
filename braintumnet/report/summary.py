"""A compact, human-readable table of the canonical metrics of any report dict.

The table has one row per metric and one column per metrics dict found in the report: the report itself, any value
at its top level that is a metrics dict (``internal_test``, ``external``, ``metrics`` ...), and the entries of
``per_site``. A metric given as ``{"mean": m, "sd": s}`` (cross-validation) prints as ``m±s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from braintumnet.metrics import METRIC_NAMES

#: What every report of figures computed on the synthetic phantom cohort says beside them (its ``note``).
SYNTHETIC_NOTE = ("Figures computed on the synthetic phantom cohort are NOT clinical results; "
                  "they show that the pipeline works, not how the model does on patients.")
# Column headings are at most this wide; longer names are shortened from the left ("…ernal_test").
_MAX_COLUMN = 16


def find_metric_sets(report: Mapping) -> dict[str, Mapping]:
    """The metrics dicts of ``report`` by name, in report order.

    A dict counts as a metrics dict when it holds at least one canonical metric name. Searched: the report itself
    (named ``metrics``), its top-level values, and one level further under ``per_site`` (named ``site:<name>``).
    """
    found: dict[str, Mapping] = {}
    if _is_metrics(report):
        found["metrics"] = report
    for key, value in report.items():
        if not isinstance(value, Mapping):
            continue
        if _is_metrics(value):
            found[str(key)] = value
        elif key == "per_site":
            found.update({f"site:{name}": sub for name, sub in value.items()
                          if isinstance(sub, Mapping) and _is_metrics(sub)})
    return found


def format_metrics(report: Mapping) -> str:
    """Format the canonical metrics of every metrics dict in ``report`` as a plain-text table.

    Args:
        report: a ``metrics.json`` as a dict, or ``{name: metrics_dict, ...}``.

    Returns:
        The table (metrics as rows, one column per metrics dict), and the synthetic-data note if the report carries
        ``"synthetic": true``. ``(no metrics found)`` if there are none.

    Examples::

        >>> print(format_metrics({"test": {"dice_tumor": 0.91, "n_cases": 12}}))  # doctest: +NORMALIZE_WHITESPACE
        metric         test
        dice_tumor    0.910
        n_cases          12
    """
    sets = find_metric_sets(report)
    if not sets:
        return "(no metrics found)"
    names = [n if len(n) <= _MAX_COLUMN else "…" + n[-(_MAX_COLUMN - 1):] for n in sets]
    metrics = [m for m in METRIC_NAMES if any(m in s for s in sets.values())]
    cells = [[_cell(m, s.get(m)) for s in sets.values()] for m in metrics]
    width0 = max(len("metric"), *(len(m) for m in metrics))
    widths = [max(len(n), *(len(row[i]) for row in cells)) for i, n in enumerate(names)]
    lines = ["  ".join(["metric".ljust(width0), *(n.rjust(w) for n, w in zip(names, widths))])]
    for metric, row in zip(metrics, cells):
        lines.append("  ".join([metric.ljust(width0), *(c.rjust(w) for c, w in zip(row, widths))]))
    if report.get("synthetic"):
        lines.append("note: synthetic (phantom) data; these are not clinical results")
    return "\n".join(lines)


def _is_metrics(value: Mapping) -> bool:
    return any(name in value for name in METRIC_NAMES)


def _cell(metric: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping) and "mean" in value:
        sd = value.get("sd")
        return _number(metric, value["mean"]) + ("" if sd is None else "±" + _number(metric, sd))
    return _number(metric, value)


def _number(metric: str, value) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "nan"
    if metric == "n_cases":
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    if metric.startswith("hd"):
        return f"{value:.1f}"
    return f"{value:.3f}"
