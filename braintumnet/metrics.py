"""Segmentation and classification metrics, per case then averaged over cases (docs/metrics.md).

Regions scored from the label maps of the data contract (0 background, 1 tumour, 2 peritumoral edema): ``tumor`` =
{1}, ``edema`` = {2}, ``whole`` = {1, 2}. A *case* is the stack of its prepared 2-D axial slices. The slices are not
contiguous (20 representative slices per volume, §2.1.2), so every distance is in-plane.

* Dice = 2TP/(2TP+FP+FN) and IoU = TP/(TP+FP+FN), pooled over all voxels of the case, so IoU = Dice/(2-Dice) <= Dice.
* Surface distances follow MONAI's ``compute_hausdorff_distance`` (edges = mask XOR its binary erosion, exact
  Euclidean distance in mm between edge pixels, both directions), computed slice by slice and pooled per direction over
  the case. HD = the largest pooled distance; HD95 = max(95th percentile of pred->GT, 95th percentile of GT->pred), the
  per-direction-percentile-then-max definition MONAI uses, so a one-slice case gives MONAI's numbers exactly.
* Empty masks (``compute_hausdorff_distance`` returns inf/NaN for them, MONAI issue #9095): an edge pixel with no
  counterpart in its own slice is at the image diagonal in mm. Over a whole case this gives the BraTS-style policy:
  missed tumour -> Dice 0, IoU 0, HD = HD95 = diagonal; false positive on an empty GT -> Dice 0, IoU 0, HD = HD95 =
  diagonal; both empty -> Dice 1, IoU 1, HD = HD95 = 0.

Classification uses scikit-learn. Case-level class probabilities are the mean of the case's slice softmax
probabilities (:func:`case_probabilities`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_confusion_matrix_metric
from monai.metrics.utils import get_surface_distance
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_NAMES",
    "REGIONS",
    "EvaluationAccumulator",
    "case_probabilities",
    "classification_metrics",
    "evaluation_summary",
    "image_diagonal_mm",
    "segmentation_case_metrics",
    "summarize_cases",
]

#: The canonical names every ``metrics.json`` carries at its top level (issue 3, point 6).
METRIC_NAMES = (
    "dice_tumor",
    "iou_tumor",
    "hd95_tumor_mm",
    "hd_tumor_mm",
    "dice_edema",
    "dice_whole",
    "acc",
    "sensitivity",
    "specificity",
    "f1",
    "auc",
    "n_cases",
)

#: Scored regions and the labels each one unites.
REGIONS: dict[str, tuple[int, ...]] = {"tumor": (1,), "edema": (2,), "whole": (1, 2)}
_MAX_LABEL = 2
_NO_DISTANCES = np.zeros(0, dtype=np.float64)


def image_diagonal_mm(shape_hw: tuple[int, int], spacing_mm: tuple[float, float]) -> float:
    """The distance given to a surface with nothing to match: sqrt((H*sy)^2 + (W*sx)^2), in mm."""
    (h, w), (sy, sx) = shape_hw, spacing_mm
    return math.hypot(h * sy, w * sx)


def _check_spacing(spacing_mm) -> tuple[float, float]:
    spacing = tuple(float(s) for s in np.asarray(spacing_mm, dtype=float).reshape(-1))
    if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be two positive in-plane spacings (rows, columns) in mm, got {spacing_mm!r}")
    return spacing  # type: ignore[return-value]


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels (an argmax, not probabilities), got dtype {labels.dtype}")
    if labels.ndim != 3:
        raise ValueError(f"{name} must be an S×H×W label map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > _MAX_LABEL):
        bad = sorted(set(np.unique(labels).tolist()) - set(range(_MAX_LABEL + 1)))
        raise ValueError(f"{name} holds label(s) {bad}; the data contract allows 0 background, 1 tumour, 2 edema")
    return labels


def _region_counts(pred: np.ndarray, target: np.ndarray, n_voxels: int) -> np.ndarray:
    """TP, FP, TN, FN of each region (rows in the order of REGIONS) for label maps that hold all the foreground of
    ``n_voxels`` voxels (the caller passes the foreground's bounding box; everything outside is TN).

    Counted here rather than with MONAI's ``get_confusion_matrix``, which gives the same numbers from one-hot tensors
    but costs about 5 ms a 256×256 slice (as much as all the surface distances); one histogram of (pred, target) label
    pairs gives every region's counts. They are summed over a case's slices, which may arrive in different batches:
    ``compute_dice``/``compute_iou`` return ratios, which cannot be pooled. The ratios are MONAI's
    (``compute_confusion_matrix_metric``), and the tests check them against ``compute_dice`` and ``compute_iou``.
    """
    n_labels = _MAX_LABEL + 1
    codes = pred.astype(np.intp) * n_labels + target
    pairs = np.bincount(codes.ravel(), minlength=n_labels**2).reshape(n_labels, n_labels)  # rows: pred, cols: target
    counts = []
    for region in REGIONS.values():
        inside = np.isin(np.arange(n_labels), region)
        tp, fp, fn = pairs[inside][:, inside].sum(), pairs[inside][:, ~inside].sum(), pairs[~inside][:, inside].sum()
        counts.append((tp, fp, n_voxels - tp - fp - fn, fn))
    return np.asarray(counts, dtype=np.float64)


def _region_mask(labels: np.ndarray, region: tuple[int, ...]) -> np.ndarray:
    mask = labels == region[0]
    for label in region[1:]:
        mask |= labels == label
    return mask


def _edges(mask: np.ndarray) -> np.ndarray:
    """``mask XOR binary_erosion(mask)`` (scipy's default cross structure, outside = background), as MONAI's
    ``get_mask_edges`` computes it; with array shifts, 3-5 times faster than ``scipy.ndimage.binary_erosion`` here."""
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[[0, -1]] = False  # outside the array is background, so the border is never interior
    interior[:, [0, -1]] = False
    return mask & ~interior


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float], penalty: float):
    """In-plane surface distances of one slice and region, in mm: (pred edge -> GT edge, GT edge -> pred edge).

    Edges and distances are MONAI's (``get_mask_edges`` with ``spacing=None``, ``get_surface_distance``). Written out
    rather than calling ``get_edge_surface_distance`` because its ``CropForegroundD`` step costs about 20 ms a slice;
    the caller crops to the bounding box of the slice's foreground with numpy instead, which gives the same edges (the
    erosion treats outside the array as background) in microseconds. An edge pixel whose counterpart mask is empty in
    this slice is at ``penalty`` (the image diagonal), where MONAI would return inf.
    """
    edges_pred, edges_gt = _edges(pred), _edges(gt)
    if not edges_gt.any():
        return np.full(np.count_nonzero(edges_pred), penalty), _NO_DISTANCES
    if not edges_pred.any():
        return _NO_DISTANCES, np.full(np.count_nonzero(edges_gt), penalty)
    return (
        np.asarray(get_surface_distance(edges_pred, edges_gt, "euclidean", spacing), dtype=np.float64),
        np.asarray(get_surface_distance(edges_gt, edges_pred, "euclidean", spacing), dtype=np.float64),
    )


@dataclass
class _CaseSegmentation:
    """What one case needs for its segmentation metrics, filled slice batch by slice batch.

    Keeps the confusion counts and the surface distances, never the masks, so an evaluation can stream.
    """

    shape_hw: tuple[int, int]
    spacing: tuple[float, float]
    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(REGIONS), 4)))  # tp, fp, tn, fn
    pred_to_gt: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in REGIONS])
    gt_to_pred: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in REGIONS])

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        penalty = image_diagonal_mm(self.shape_hw, self.spacing)
        for pred_slice, target_slice in zip(pred, target):
            foreground = (pred_slice > 0) | (target_slice > 0)  # every region lies inside "whole"
            rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
            if rows.size == 0:
                self.counts[:, 2] += pred_slice.size  # all true negatives; no surface, no distance
                continue
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            pred_box, target_box = pred_slice[box], target_slice[box]
            self.counts += _region_counts(pred_box, target_box, pred_slice.size)
            for r, labels in enumerate(REGIONS.values()):
                d_pg, d_gp = _surface_distances(
                    _region_mask(pred_box, labels), _region_mask(target_box, labels), self.spacing, penalty
                )
                self.pred_to_gt[r].append(d_pg)
                self.gt_to_pred[r].append(d_gp)

    def metrics(self) -> dict[str, float]:
        counts = torch.from_numpy(self.counts)
        # 0/0 (both masks empty in the whole case) comes back NaN; the BraTS convention scores it 1.
        dice = torch.nan_to_num(compute_confusion_matrix_metric("f1 score", counts), nan=1.0)
        iou = torch.nan_to_num(compute_confusion_matrix_metric("threat score", counts), nan=1.0)
        out: dict[str, float] = {}
        for r, region in enumerate(REGIONS):
            directions = [np.concatenate([_NO_DISTANCES, *d]) for d in (self.pred_to_gt[r], self.gt_to_pred[r])]
            directions = [d for d in directions if d.size]
            out[f"dice_{region}"] = float(dice[r])
            out[f"iou_{region}"] = float(iou[r])
            # MONAI: the percentile of each direction, then the larger (torch.quantile == numpy's "linear" method).
            out[f"hd95_{region}_mm"] = float(max((np.percentile(d, 95) for d in directions), default=0.0))
            out[f"hd_{region}_mm"] = float(max((d.max() for d in directions), default=0.0))
        return out


def segmentation_case_metrics(
    pred: np.ndarray, target: np.ndarray, spacing_mm: tuple[float, float]
) -> dict[str, float]:
    """Dice, IoU, HD95 and HD (mm) of one case for the regions tumour, edema and whole.

    Args:
        pred: S×H×W predicted labels (0, 1, 2) of the case's S slices.
        target: S×H×W reference labels, same shape.
        spacing_mm: in-plane spacing (rows, columns) in mm, in array axis order as MONAI's ``spacing``.

    Returns:
        ``dice_tumor, iou_tumor, hd95_tumor_mm, hd_tumor_mm`` and the same for ``edema`` and ``whole``, as floats.

    Raises:
        ValueError: naming a shape mismatch, a label outside {0, 1, 2} or a bad spacing.

    Examples::

        >>> gt = np.zeros((1, 8, 8), int); gt[0, 2:6, 2:6] = 1
        >>> segmentation_case_metrics(gt, gt, (1.0, 1.0))["dice_tumor"]
        1.0
    """
    pred, target = _check_labels("pred", pred), _check_labels("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same S×H×W shape, got {pred.shape} and {target.shape}")
    case = _CaseSegmentation(shape_hw=pred.shape[1:], spacing=_check_spacing(spacing_mm))
    case.add(pred, target)
    return case.metrics()


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


def _first_appearance(case_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique case ids in order of first appearance and, for each slice, the index of its case in that list."""
    ids = np.asarray([str(c) for c in case_ids])
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return uniq[order].tolist(), rank[inverse.reshape(-1)]


def case_probabilities(slice_probs: np.ndarray, case_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Case-level class probabilities: the mean of the case's slice softmax probabilities.

    The mean is simple, stays a probability vector (rows still sum to 1, so AUCs and argmax behave), and one or two
    slices of a case that the model gets badly wrong move it only by their share rather than deciding it, as a
    majority vote or a max would let a single confident slice do.

    Args:
        slice_probs: (n_slices, K) softmax probabilities.
        case_ids: the case id of each slice.

    Returns:
        The case ids in order of first appearance and their (n_cases, K) probabilities.
    """
    slice_probs = np.asarray(slice_probs, dtype=np.float64)
    if slice_probs.ndim != 2 or slice_probs.shape[0] != len(case_ids):
        raise ValueError(f"slice_probs must be n_slices×K with one case id per slice, got {slice_probs.shape} "
                         f"and {len(case_ids)} case ids")
    ids, index = _first_appearance(case_ids)
    sums = np.zeros((len(ids), slice_probs.shape[1]))
    np.add.at(sums, index, slice_probs)
    return ids, sums / np.bincount(index, minlength=len(ids))[:, None]


def summarize_cases(rows: list[dict]) -> dict[str, float]:
    """The mean over cases of every numeric key of the per-case rows (strings and booleans skipped), plus n_cases."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "n_cases"]
    out: dict[str, float] = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) for v in values):
            out[key] = float(np.mean(values))
    out["n_cases"] = len(rows)
    return out


class EvaluationAccumulator:
    """Collects per-slice predictions batch by batch and turns them into per-case metrics and their summary.

    Segmentation keeps only confusion counts and surface distances per case, never the masks, so memory does not grow
    with the number of slices, and the slices of one case may arrive in any batches, in any order.

    Args:
        class_names: the K class names, in index order (``braintumnet.data.contract.class_names(task)``).

    Examples::

        acc = EvaluationAccumulator(("glioma", "metastasis", "meningioma"))
        for batch in loader:
            out = model(batch["image"])
            acc.update(out.seg_logits.argmax(1), batch["mask"], out.cls_logits.softmax(1), batch["label"],
                       batch["case_id"], batch["spacing_mm"])
        metrics, per_case = acc.summary(), acc.case_rows()
    """

    def __init__(self, class_names: Sequence[str]):
        if len(class_names) < 2:
            raise ValueError(f"class_names must name at least two classes, got {list(class_names)!r}")
        self.class_names = tuple(class_names)
        self._cases: dict[str, _CaseSegmentation] = {}
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._case_ids: list[str] = []
        self._tumor_types: list[str | None] = []

    def update(
        self,
        seg_pred,
        seg_target,
        slice_probs,
        labels,
        case_ids: Sequence[str],
        spacings_mm,
        tumor_types: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of slices.

        Args:
            seg_pred: B×H×W predicted labels (tensor or array).
            seg_target: B×H×W (or B×1×H×W) reference labels.
            slice_probs: B×K class probabilities of each slice.
            labels: (B,) true class index of each slice.
            case_ids: the case id of each slice (unique across sites when sites are pooled).
            spacings_mm: in-plane spacing (rows, columns) in mm: one pair for the batch, B pairs, or a mapping from
                case id to its pair.
            tumor_types: the tumour type of each slice, for the per-type means; defaults to the class name.
        """
        seg_pred, seg_target = _to_numpy(seg_pred), _to_numpy(seg_target)
        if seg_target.ndim == 4 and seg_target.shape[1] == 1:
            seg_target = seg_target[:, 0]
        seg_pred, seg_target = _check_labels("seg_pred", seg_pred), _check_labels("seg_target", seg_target)
        probs, labels = _to_numpy(slice_probs).astype(np.float64), _to_numpy(labels).astype(int).reshape(-1)
        n = seg_pred.shape[0]
        if seg_target.shape != seg_pred.shape or probs.shape != (n, len(self.class_names)) or labels.shape != (n,) \
                or len(case_ids) != n or (tumor_types is not None and len(tumor_types) != n):
            raise ValueError(
                f"a batch of {n} slices needs seg_target {seg_pred.shape}, slice_probs ({n}, {len(self.class_names)}),"
                f" labels ({n},) and {n} case ids (and tumour types); got {seg_target.shape}, {probs.shape}, "
                f"{labels.shape}, {len(case_ids)} (and {None if tumor_types is None else len(tumor_types)})")
        spacings = _spacings_per_slice(spacings_mm, case_ids)
        ids, index = _first_appearance(case_ids)
        for i, case_id in enumerate(ids):
            rows = np.flatnonzero(index == i)
            spacing = spacings[rows[0]]
            if any(spacings[r] != spacing for r in rows):
                found = sorted({spacings[r] for r in rows})
                raise ValueError(f"case {case_id}: its slices carry different spacings {found}")
            case = self._cases.setdefault(case_id, _CaseSegmentation(seg_pred.shape[1:], spacing))
            if (case.shape_hw, case.spacing) != (seg_pred.shape[1:], spacing):
                raise ValueError(f"case {case_id}: slices of {seg_pred.shape[1:]} at {spacing} mm after slices of "
                                 f"{case.shape_hw} at {case.spacing} mm")
            case.add(seg_pred[rows], seg_target[rows])
        self._probs.append(probs)
        self._labels.append(labels)
        self._case_ids.extend(str(c) for c in case_ids)
        self._tumor_types.extend([None] * n if tumor_types is None else [str(t) for t in tumor_types])

    def case_rows(self) -> list[dict]:
        """One row per case, in order of first appearance: ``case_id``, ``label`` (class name), ``tumor_type``, its
        segmentation metrics and its class probabilities ``prob_<class>``."""
        if not self._case_ids:
            raise ValueError("no slices were added: call update() before asking for metrics")
        probs, labels = np.concatenate(self._probs), np.concatenate(self._labels)
        ids, case_probs = case_probabilities(probs, self._case_ids)
        _, index = _first_appearance(self._case_ids)
        rows = []
        for i, case_id in enumerate(ids):
            of_case = np.flatnonzero(index == i)
            case_labels = np.unique(labels[of_case])
            if case_labels.size != 1:
                raise ValueError(f"case {case_id}: its slices carry different class labels {case_labels.tolist()}")
            label = self.class_names[case_labels[0]]
            types = {self._tumor_types[j] or label for j in of_case}
            if len(types) != 1:
                raise ValueError(f"case {case_id}: its slices carry different tumour types {sorted(types)}")
            row = {"case_id": case_id, "label": label, "tumor_type": types.pop()}
            row.update(self._cases[case_id].metrics())
            row.update({f"prob_{name}": float(p) for name, p in zip(self.class_names, case_probs[i])})
            rows.append(row)
        return rows

    def summary(self) -> dict:
        """The flat metrics dict: :data:`METRIC_NAMES` first, then the extras (docs/metrics.md)."""
        rows = self.case_rows()
        seg = summarize_cases([{k: v for k, v in row.items() if not k.startswith("prob_")} for row in rows])
        y_case = np.array([self.class_names.index(row["label"]) for row in rows])
        p_case = np.array([[row[f"prob_{name}"] for name in self.class_names] for row in rows])
        cls_case = classification_metrics(y_case, p_case, self.class_names)
        cls_slice = classification_metrics(np.concatenate(self._labels), np.concatenate(self._probs), self.class_names)

        out: dict = {**seg, **cls_case}
        out = {name: out[name] for name in METRIC_NAMES} | {k: v for k, v in out.items() if k not in METRIC_NAMES}
        # The paper's Table 1 reports tumour segmentation per tumour type.
        for tumor_type in dict.fromkeys(row["tumor_type"] for row in rows):
            means = summarize_cases([row for row in rows if row["tumor_type"] == tumor_type])
            for metric in ("dice", "iou", "hd95", "hd"):
                unit = "_mm" if metric.startswith("hd") else ""
                out[f"{metric}_tumor_{tumor_type}{unit}"] = means[f"{metric}_tumor{unit}"]
            out[f"n_cases_{tumor_type}"] = means["n_cases"]
        out.update({f"slice_{k}": v for k, v in cls_slice.items()})
        out["n_slices"] = len(self._case_ids)
        return out


def evaluation_summary(
    seg_pred,
    seg_target,
    slice_probs,
    labels,
    case_ids: Sequence[str],
    spacings_mm,
    class_names: Sequence[str],
    tumor_types: Sequence[str] | None = None,
) -> tuple[dict, pd.DataFrame]:
    """All evaluation metrics of a set of slices in one call: per case, then averaged (see
    :class:`EvaluationAccumulator`, which does the same batch by batch).

    Args:
        seg_pred: N×H×W predicted labels.
        seg_target: N×H×W reference labels.
        slice_probs: N×K slice class probabilities.
        labels: (N,) true class index per slice.
        case_ids: case id per slice.
        spacings_mm: (rows, columns) in mm for all slices, N pairs, or a mapping case id -> pair.
        class_names: the K class names.
        tumor_types: tumour type per slice for the per-type means; defaults to the class name.

    Returns:
        ``(metrics, per_case)``. ``metrics`` is flat and JSON-serialisable: :data:`METRIC_NAMES` first (segmentation
        of tumour, edema and whole; case-level classification; ``n_cases``), then ``iou/hd95/hd`` of edema and whole,
        per class ``sensitivity_<c>, specificity_<c>, auc_<c>``, per tumour type ``dice/iou/hd95/hd_tumor_<type>``
        and ``n_cases_<type>``, ``confusion_matrix`` and slice-level classification as ``slice_*``. ``per_case`` has
        one row per case (:meth:`EvaluationAccumulator.case_rows`).
    """
    acc = EvaluationAccumulator(class_names)
    acc.update(seg_pred, seg_target, slice_probs, labels, case_ids, spacings_mm, tumor_types)
    return acc.summary(), pd.DataFrame(acc.case_rows())


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _spacings_per_slice(spacings_mm, case_ids: Sequence[str]) -> list[tuple[float, float]]:
    if isinstance(spacings_mm, Mapping):
        missing = sorted({str(c) for c in case_ids} - {str(k) for k in spacings_mm})
        if missing:
            raise ValueError(f"spacings_mm has no entry for case(s) {missing}")
        by_case = {str(k): _check_spacing(v) for k, v in spacings_mm.items()}
        return [by_case[str(c)] for c in case_ids]
    array = _to_numpy(spacings_mm).astype(float)
    if array.shape == (2,):
        return [_check_spacing(array)] * len(case_ids)
    if array.shape == (len(case_ids), 2):
        return [_check_spacing(row) for row in array]
    raise ValueError(f"spacings_mm must be one (rows, columns) pair, one pair per slice or a mapping by case id; "
                     f"got shape {array.shape} for {len(case_ids)} slices")
