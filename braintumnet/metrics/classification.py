"""Classification metrics (scikit-learn) and the pooling of slice probabilities into a case's (docs/metrics.md).

A case's class probabilities are the mean of the softmax probabilities of its slices weighted by the area of the
region that gates its classifier in the predicted mask (all its slices equally where it predicts none), as
``braintumnet predict`` pools them (:func:`case_probabilities`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

logger = logging.getLogger("braintumnet.metrics")


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, macro sensitivity/specificity/F1, macro one-vs-rest AUC and the confusion matrix.

    The predicted class is the argmax of ``probs``. Sensitivity and F1 are scikit-learn's macro averages with
    ``zero_division=nan``: a class absent from ``y_true`` has no recall and is left out of the mean. Specificity of
    class k is TN/(TN+FP) one-vs-rest, averaged the same way. AUC is scikit-learn's ``roc_auc_score`` per class,
    one-vs-rest, and their mean (what ``multi_class="ovr", average="macro"`` computes); for K=2 it is the binary AUC of
    class 1. If a class is absent from ``y_true`` the AUC is undefined: it is NaN, with a warning logged, rather than
    an exception.

    Args:
        y_true: (n,) true class indices in [0, K).
        probs: (n, K) class probabilities (softmax).
        class_names: the K class names, in index order.

    Returns:
        ``acc, sensitivity, specificity, f1, auc`` (floats), ``confusion_matrix`` (K lists of K ints, rows = true) and
        per class ``sensitivity_<name>, specificity_<name>, auc_<name>``.
    """
    y_true = np.asarray(y_true).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (y_true.size, n_classes):
        raise ValueError(f"probs must be n×K = {y_true.size}×{n_classes} for {list(class_names)}, got {probs.shape}")
    if y_true.size == 0:
        raise ValueError("classification_metrics needs at least one sample, got none")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true holds class index {int(y_true.max())} outside 0..{n_classes - 1} of {class_names}")
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1)

    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    tn, fp = mcm[:, 0, 0].astype(float), mcm[:, 0, 1].astype(float)
    specificity = np.divide(tn, tn + fp, out=np.full(n_classes, np.nan), where=(tn + fp) > 0)
    aucs = np.full(n_classes, np.nan)
    for k in labels:
        positives = y_true == k
        if 0 < positives.sum() < y_true.size:
            aucs[k] = roc_auc_score(positives, probs[:, k])
    missing = [class_names[k] for k in labels if not (y_true == k).any()]
    if missing:
        logger.warning("AUC is undefined (NaN): no sample of class %s among %d", ", ".join(missing), y_true.size)
        auc = float("nan")
    elif n_classes == 2:
        auc = float(aucs[1])
    else:
        auc = float(np.mean(aucs))

    out: dict = {
        "acc": float(accuracy_score(y_true, y_pred)),
        "sensitivity": _nanmean(recall),
        "specificity": _nanmean(specificity),
        "f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan)),
        "auc": auc,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    for k, name in enumerate(class_names):
        out[f"sensitivity_{name}"] = float(recall[k])
        out[f"specificity_{name}"] = float(specificity[k])
        out[f"auc_{name}"] = float(aucs[k])
    return out


def first_appearance(case_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique case ids in order of first appearance and, for each slice, the index of its case in that list."""
    ids = np.asarray([str(c) for c in case_ids])
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return uniq[order].tolist(), rank[inverse.reshape(-1)]


def case_probabilities(slice_probs: np.ndarray, case_ids: Sequence[str],
                       weights: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Case-level class probabilities: the mean of the softmax probabilities of the case's slices, weighted by
    ``weights``, or the plain mean of all its slices where its weights are all 0 (or ``weights`` is None).

    The evaluation and ``braintumnet predict`` pass ``weights`` = the area (pixels) of the region that gates the
    classifier in each slice's *predicted* mask. A test case holds every slice of the head, most of them without a
    lesion: there the classifier sees an empty gate, so their probabilities carry no evidence (weight 0). Among the
    slices with a predicted lesion, a slice through the bulk of the tumour shows the classifier its whole appearance
    (rim, necrosis, dural base) while a false-positive speck of a few pixels on a tumour-free slice shows it nothing
    of the type; weighting by area lets the first decide and the second barely count. Measured on the synthetic
    cohort: an equal vote of every slice with a predicted lesion let a model's handful of small false positives
    (classified as whichever type its biases favour) outvote the tumour's own slices. The choice needs the
    prediction only, never the reference. The weighted mean stays a probability vector (rows sum to 1, so AUCs and
    argmax behave). Boolean weights give the plain mean over the slices marked True.

    Args:
        slice_probs: (n_slices, K) softmax probabilities.
        case_ids: the case id of each slice.
        weights: (n_slices,) non-negative weights (pixel counts or booleans); None = all slices equally.

    Returns:
        The case ids in order of first appearance and their (n_cases, K) probabilities.
    """
    slice_probs = np.asarray(slice_probs, dtype=np.float64)
    if slice_probs.ndim != 2 or slice_probs.shape[0] != len(case_ids):
        raise ValueError(f"slice_probs must be n_slices×K with one case id per slice, got {slice_probs.shape} "
                         f"and {len(case_ids)} case ids")
    ids, index = first_appearance(case_ids)
    w = np.ones(len(index)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != index.shape:
        raise ValueError(f"weights must hold one value per slice ({len(index)}), got {w.size}")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite and >= 0")
    totals = np.bincount(index, weights=w, minlength=len(ids))
    w = np.where((totals == 0)[index], 1.0, w)  # a case without any weight pools all of its slices equally
    sums = np.zeros((len(ids), slice_probs.shape[1]))
    np.add.at(sums, index, slice_probs * w[:, None])
    return ids, sums / np.bincount(index, weights=w, minlength=len(ids))[:, None]
