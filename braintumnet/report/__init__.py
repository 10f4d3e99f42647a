"""Tables and figures of the numbers an evaluation measured: ``summary`` (terminal tables), ``plots`` (PNG files).

Every figure is drawn from arrays the caller already holds (or from a ``metrics.json``); nothing here trains or
evaluates a model.
"""

from braintumnet.report.summary import SYNTHETIC_NOTE, format_metrics

__all__ = ["SYNTHETIC_NOTE", "format_metrics"]
