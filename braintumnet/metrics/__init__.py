"""Segmentation and classification metrics, per case then summarised over cases (docs/metrics.md).

``segmentation``: Dice, IoU and 3-D surface distances of one case; ``classification``: scikit-learn's metrics and
the pooling of slice probabilities into a case's; ``accumulator``: both over a whole evaluation, batch by batch;
``repetitions``: mean ± sd over seeds and folds.
"""

from braintumnet.metrics.accumulator import (ALL_SLICES_KEYS, MEDIAN_KEYS, METRIC_NAMES, EvaluationAccumulator,
                                             evaluation_summary, summarize_cases)
from braintumnet.metrics.classification import case_probabilities, classification_metrics
from braintumnet.metrics.repetitions import mean_sd, mean_sd_columns, mean_sd_tree
from braintumnet.metrics.segmentation import HD_PENALTY_MM, REGIONS, segmentation_case_metrics

__all__ = [
    "ALL_SLICES_KEYS",
    "HD_PENALTY_MM",
    "MEDIAN_KEYS",
    "METRIC_NAMES",
    "REGIONS",
    "EvaluationAccumulator",
    "case_probabilities",
    "classification_metrics",
    "evaluation_summary",
    "mean_sd",
    "mean_sd_columns",
    "mean_sd_tree",
    "segmentation_case_metrics",
    "summarize_cases",
]
