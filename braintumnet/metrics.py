"""Segmentation and classification metrics, per case then summarised over cases (docs/metrics.md).

Regions scored from the label maps of the data contract (0 background, 1 tumour, 2 peritumoral edema): ``tumor`` =
{1}, ``edema`` = {2}, ``whole`` = {1, 2}. A *case* is the stack of its prepared 2-D axial slices. A test case holds
every slice inside the head, contiguous, so it is a volume on its own grid (the prepared in-plane spacing, the scan's
slice spacing along z) and is scored in 3-D. Slices with a gap between them (a training case's representative
slices) are never bridged: each contiguous run of slices is a volume of its own, a lone slice is scored in-plane.

* Dice = 2TP/(2TP+FP+FN) and IoU = TP/(TP+FP+FN), pooled over all voxels of the case, so IoU = Dice/(2-Dice) <= Dice.
* Surface distances follow MONAI's ``compute_hausdorff_distance`` (edges = mask XOR its binary erosion, exact
  Euclidean distance in mm between edge voxels, both directions), run by run, pooled per direction over the case.
  HD = the largest pooled distance; HD95 = max(95th percentile of pred->GT, 95th percentile of GT->pred), the
  per-direction-percentile-then-max definition MONAI uses, so a case of one run gives MONAI's 3-D numbers exactly.
* Empty masks, the BraTS convention (``compute_hausdorff_distance`` returns inf/NaN for them): reference and
  prediction both empty in the case -> Dice 1, IoU 1, HD = HD95 = 0; exactly one empty -> Dice 0, IoU 0,
  HD = HD95 = ``HD_PENALTY_MM`` (374 mm, as BraTS scores a miss). Inside a case with gaps, a surface voxel whose run
  holds nothing of the other mask is at ``HD_PENALTY_MM`` too.

Classification uses scikit-learn. A case's class probabilities are the mean of the softmax probabilities of its
slices weighted by the area of the region that gates its classifier in the predicted mask (all its slices equally
where it predicts none), as ``braintumnet predict`` pools them (:func:`case_probabilities`).
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

from braintumnet.data.contract import TUMOUR_LABEL

logger = logging.getLogger(__name__)

__all__ = [
    "HD_PENALTY_MM",
    "METRIC_NAMES",
    "REGIONS",
    "EvaluationAccumulator",
    "case_probabilities",
    "classification_metrics",
    "evaluation_summary",
    "segmentation_case_metrics",
    "summarize_cases",
]

#: The canonical names every ``metrics.json`` carries at its top level, in this order.
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
#: HD and HD95 of a region that exactly one of reference and prediction holds (a missed lesion, or a lesion predicted
#: where there is none), in mm: the BraTS challenges' value, about the diagonal of their 240×240×155 mm volume, so a
#: miss costs the same on every site whatever its field of view.
HD_PENALTY_MM = 374.0
#: Segmentation keys whose median over cases is reported beside the mean (``<name>_median``, before any ``_mm``).
MEDIAN_KEYS = ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "dice_whole")
#: Case-level classification keys also reported with every slice of a case pooled (``<name>_all_slices``).
ALL_SLICES_KEYS = ("acc", "sensitivity", "specificity", "f1", "auc")
_MAX_LABEL = 2
_NO_DISTANCES = np.zeros(0, dtype=np.float64)


def _check_spacing(spacing_mm) -> tuple[float, float]:
    spacing = tuple(float(s) for s in np.asarray(spacing_mm, dtype=float).reshape(-1))
    if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be two positive in-plane spacings (rows, columns) in mm, got {spacing_mm!r}")
    return spacing  # type: ignore[return-value]


def _check_spacing_z(spacing_z_mm) -> float | None:
    if spacing_z_mm is None:
        return None
    value = float(spacing_z_mm)
    if math.isnan(value):  # a cache written before the column existed: no through-plane neighbours known
        return None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"spacing_z_mm must be a positive slice spacing in mm (or None), got {spacing_z_mm!r}")
    return value


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
    ``n_voxels`` voxels (the caller passes the foreground voxels only; everything else is TN).

    Counted here rather than with MONAI's ``get_confusion_matrix``, which gives the same numbers from one-hot tensors
    at many times the cost; one histogram of (pred, target) label pairs gives every region's counts. They are summed
    over a case's slices, which may arrive in different batches: ``compute_dice``/``compute_iou`` return ratios,
    which cannot be pooled. The ratios are MONAI's (``compute_confusion_matrix_metric``), and the tests check them
    against ``compute_dice`` and ``compute_iou``.
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
    """``mask XOR binary_erosion(mask)`` (scipy's default cross structure, outside = background) in any dimension,
    as MONAI's ``get_mask_edges`` computes it; with array shifts, 3-5 times faster than scipy's ``binary_erosion``."""
    interior = mask.copy()
    for axis in range(mask.ndim):
        first, last = _along(mask.ndim, axis, slice(1, None)), _along(mask.ndim, axis, slice(None, -1))
        interior[first] &= mask[last]
        interior[last] &= mask[first]
        interior[_along(mask.ndim, axis, [0, -1])] = False  # outside is background: the border is never interior
    return mask & ~interior


def _along(ndim: int, axis: int, index) -> tuple:
    """An index that applies ``index`` along ``axis`` and takes everything along the other axes."""
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a mask's voxels (None if it has none)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]):
    """Surface distances of one region in one run of slices, in mm: (pred edge -> GT edge, GT edge -> pred edge).

    Edges and distances are MONAI's (``get_mask_edges`` with ``spacing=None``, ``get_surface_distance``, a KD-tree
    over the edge voxels on the CPU). Written out rather than calling ``get_edge_surface_distance`` because its
    ``CropForegroundD`` step costs about 20 ms a slice; the caller crops to the bounding box of the two masks with
    numpy instead, which gives the same edges (the erosion treats outside the array as background) in microseconds.
    An edge voxel whose counterpart mask is empty in this run is at ``HD_PENALTY_MM``, where MONAI would return inf.
    """
    edges_pred, edges_gt = _edges(pred), _edges(gt)
    if not edges_gt.any():
        return np.full(np.count_nonzero(edges_pred), HD_PENALTY_MM), _NO_DISTANCES
    if not edges_pred.any():
        return _NO_DISTANCES, np.full(np.count_nonzero(edges_gt), HD_PENALTY_MM)
    return (
        np.asarray(get_surface_distance(edges_pred, edges_gt, "euclidean", spacing), dtype=np.float64),
        np.asarray(get_surface_distance(edges_gt, edges_pred, "euclidean", spacing), dtype=np.float64),
    )


@dataclass
class _CaseSegmentation:
    """What one case needs for its segmentation metrics, filled slice batch by slice batch.

    Keeps the confusion counts and, of each slice with any foreground (in either mask), only the bounding box of that
    foreground, so an evaluation can stream; ``metrics()`` stacks the boxes back into volumes and then lets them go.

    Args:
        shape_hw: the slices' shape.
        spacing: in-plane spacing (rows, columns), mm.
        spacing_z: the distance between neighbouring axial slices, mm; None = no slice is a neighbour of another, so
            every slice is scored in-plane.
    """

    shape_hw: tuple[int, int]
    spacing: tuple[float, float]
    spacing_z: float | None = None
    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(REGIONS), 4)))  # tp, fp, tn, fn
    z_seen: set[int] = field(default_factory=set)
    planes: dict[int, tuple[int, int, np.ndarray, np.ndarray]] = field(default_factory=dict)
    result: dict[str, float] | None = None

    def add(self, pred: np.ndarray, target: np.ndarray, z: np.ndarray) -> None:
        """Add ``S×H×W`` predicted and reference labels of the axial slices ``z`` (indices in the volume)."""
        if self.result is not None:
            raise ValueError("slices added to a case that was already closed (its metrics computed)")
        z = [int(i) for i in z]
        if len(set(z)) != len(z) or not self.z_seen.isdisjoint(z):
            repeated = sorted({i for i in z if i in self.z_seen or z.count(i) > 1})
            raise ValueError(f"the same axial slice came twice: z = {repeated}")
        foreground = (pred > 0) | (target > 0)  # every region lies inside "whole"
        self.counts += _region_counts(pred[foreground], target[foreground], pred.size)
        self.z_seen.update(z)
        for i in np.flatnonzero(foreground.any(axis=(1, 2))):
            rows, cols = _box(foreground[i])
            self.planes[z[i]] = (rows.start, cols.start, pred[i][rows, cols].copy(), target[i][rows, cols].copy())

    def present(self, r: int) -> tuple[bool, bool]:
        """Whether the reference and the prediction hold region ``r`` anywhere in the case."""
        tp, fp, _, fn = self.counts[r]
        return bool(tp + fn > 0), bool(tp + fp > 0)

    def metrics(self) -> dict[str, float]:
        """Dice, IoU, HD95 and HD of each region; computed once, after which the stored slices are dropped."""
        if self.result is None:
            self.result = self._compute()
            self.planes = {}
        return self.result

    def _runs(self) -> list[np.ndarray]:
        """The case's slices as runs of neighbours: contiguous axial indices (every slice alone without spacing_z)."""
        z = np.sort(np.fromiter(self.z_seen, dtype=int, count=len(self.z_seen)))
        if self.spacing_z is None:
            return [z[i:i + 1] for i in range(z.size)]
        return np.split(z, np.flatnonzero(np.diff(z) != 1) + 1)

    def _compute(self) -> dict[str, float]:
        counts = torch.from_numpy(self.counts)
        # 0/0 (both masks empty in the whole case) comes back NaN; the BraTS convention scores it 1.
        dice = torch.nan_to_num(compute_confusion_matrix_metric("f1 score", counts), nan=1.0)
        iou = torch.nan_to_num(compute_confusion_matrix_metric("threat score", counts), nan=1.0)
        both = [r for r in range(len(REGIONS)) if all(self.present(r))]
        distances = self._distances(both)
        out: dict[str, float] = {}
        for r, region in enumerate(REGIONS):
            out[f"dice_{region}"] = float(dice[r])
            out[f"iou_{region}"] = float(iou[r])
            if r in both:
                directions = [np.concatenate([_NO_DISTANCES, *d]) for d in distances[r]]
                directions = [d for d in directions if d.size]
                # MONAI: the percentile of each direction, then the larger (torch.quantile == numpy's "linear").
                hd95 = max((float(np.percentile(d, 95)) for d in directions), default=0.0)
                hd = max((float(d.max()) for d in directions), default=0.0)
            else:  # both empty: a perfect 0; exactly one empty: the fixed penalty
                hd95 = hd = HD_PENALTY_MM if any(self.present(r)) else 0.0
            out[f"hd95_{region}_mm"], out[f"hd_{region}_mm"] = hd95, hd
        return out

    def _distances(self, regions: list[int]) -> dict[int, tuple[list, list]]:
        """Per region, the (pred->GT, GT->pred) surface distances of every run, in mm."""
        found: dict[int, tuple[list, list]] = {r: ([], []) for r in regions}
        if not regions:
            return found
        labels = list(REGIONS.values())
        for run in self._runs():
            held = [int(z) for z in run if int(z) in self.planes]
            if not held:
                continue
            # The run's volume, cropped to the bounding box of its foreground: distances only ever look inside it.
            row0 = min(self.planes[z][0] for z in held)
            col0 = min(self.planes[z][1] for z in held)
            row1 = max(self.planes[z][0] + self.planes[z][2].shape[0] for z in held)
            col1 = max(self.planes[z][1] + self.planes[z][2].shape[1] for z in held)
            shape = (held[-1] - held[0] + 1, row1 - row0, col1 - col0)
            pred, target = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            for z in held:
                r, c, p, t = self.planes[z]
                at = (z - held[0], slice(r - row0, r - row0 + p.shape[0]), slice(c - col0, c - col0 + p.shape[1]))
                pred[at], target[at] = p, t
            lone = run.size == 1  # no through-plane neighbour: in-plane edges and distances
            spacing = self.spacing if lone else (self.spacing_z, *self.spacing)
            for r in regions:
                p_mask, t_mask = _region_mask(pred, labels[r]), _region_mask(target, labels[r])
                box = _box(p_mask | t_mask)
                if box is None:
                    continue
                p_mask, t_mask = p_mask[box], t_mask[box]
                if lone:
                    p_mask, t_mask = p_mask[0], t_mask[0]
                d_pg, d_gp = _surface_distances(p_mask, t_mask, spacing)
                found[r][0].append(d_pg)
                found[r][1].append(d_gp)
        return found


def segmentation_case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing_mm: tuple[float, float],
    spacing_z_mm: float | None = None,
    z_index: Sequence[int] | None = None,
) -> dict[str, float]:
    """Dice, IoU, HD95 and HD (mm) of one case for the regions tumour, edema and whole.

    Args:
        pred: S×H×W predicted labels (0, 1, 2) of the case's S axial slices.
        target: S×H×W reference labels, same shape.
        spacing_mm: in-plane spacing (rows, columns) in mm, in array axis order as MONAI's ``spacing``.
        spacing_z_mm: the distance between neighbouring slices, mm; with it the case is scored in 3-D (each run of
            contiguous slices a volume), without it every slice in-plane.
        z_index: the axial index of each slice; default ``0 .. S-1`` (the slices are contiguous, in order).

    Returns:
        ``dice_tumor, iou_tumor, hd95_tumor_mm, hd_tumor_mm`` and the same for ``edema`` and ``whole``, as floats.

    Raises:
        ValueError: naming a shape mismatch, a label outside {0, 1, 2}, a bad spacing or a repeated slice.

    Examples::

        >>> gt = np.zeros((1, 8, 8), int); gt[0, 2:6, 2:6] = 1
        >>> segmentation_case_metrics(gt, gt, (1.0, 1.0))["dice_tumor"]
        1.0
    """
    pred, target = _check_labels("pred", pred), _check_labels("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same S×H×W shape, got {pred.shape} and {target.shape}")
    z = np.arange(pred.shape[0]) if z_index is None else np.asarray(z_index, dtype=int).reshape(-1)
    if z.shape != (pred.shape[0],):
        raise ValueError(f"z_index must give one axial index per slice ({pred.shape[0]}), got {z.size}")
    case = _CaseSegmentation(shape_hw=pred.shape[1:], spacing=_check_spacing(spacing_mm),
                             spacing_z=_check_spacing_z(spacing_z_mm))
    case.add(pred, target, z)
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
    ids, index = _first_appearance(case_ids)
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

    Segmentation keeps confusion counts and the foreground boxes of each case's slices, never whole masks, and
    :meth:`close` computes a finished case's metrics and drops its boxes, so memory stays bounded by the lesions
    of the open cases. The slices of one case may arrive in any batches, in any order.

    Args:
        class_names: the K class names, in index order (``braintumnet.data.contract.class_names(task)``).
        gate_labels: the labels of the region that gates the model's classifier (``braintumnet.model.GATE_LABELS``);
            a case's class probabilities pool its slices where the prediction holds one of them
            (:func:`case_probabilities`).

    Examples::

        acc = EvaluationAccumulator(("glioma", "metastasis", "meningioma"))
        for batch in loader:
            out = model(batch["image"])
            acc.update(out.seg_logits.argmax(1), batch["mask"], out.cls_logits.softmax(1), batch["label"],
                       batch["case_id"], batch["spacing_mm"], z_index=batch["z"], spacing_z_mm=batch["spacing_z"])
        metrics, per_case = acc.summary(), acc.case_rows()
    """

    def __init__(self, class_names: Sequence[str], gate_labels: Sequence[int] = (TUMOUR_LABEL,)):
        if len(class_names) < 2:
            raise ValueError(f"class_names must name at least two classes, got {list(class_names)!r}")
        self.class_names = tuple(class_names)
        self.gate_labels = tuple(int(g) for g in gate_labels)
        self._cases: dict[str, _CaseSegmentation] = {}
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._gate_area: list[np.ndarray] = []  # per slice: pixels of the gate region in the prediction
        self._with_tumour: list[np.ndarray] = []  # per slice: the reference holds tumour
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
        *,
        z_index=None,
        spacing_z_mm=None,
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
            z_index: (B,) axial index of each slice in its volume; None = the order the case's slices arrive in.
            spacing_z_mm: the distance between neighbouring axial slices in mm (one value, B values or a mapping by
                case id); None (or NaN) = none known, every slice is scored in-plane.
        """
        seg_pred, seg_target = _to_numpy(seg_pred), _to_numpy(seg_target)
        if seg_target.ndim == 4 and seg_target.shape[1] == 1:
            seg_target = seg_target[:, 0]
        seg_pred, seg_target = _check_labels("seg_pred", seg_pred), _check_labels("seg_target", seg_target)
        probs, labels = _to_numpy(slice_probs).astype(np.float64), _to_numpy(labels).astype(int).reshape(-1)
        n = seg_pred.shape[0]
        z_all = None if z_index is None else _to_numpy(z_index).astype(int).reshape(-1)
        if seg_target.shape != seg_pred.shape or probs.shape != (n, len(self.class_names)) or labels.shape != (n,) \
                or len(case_ids) != n or (tumor_types is not None and len(tumor_types) != n) \
                or (z_all is not None and z_all.shape != (n,)):
            raise ValueError(
                f"a batch of {n} slices needs seg_target {seg_pred.shape}, slice_probs ({n}, {len(self.class_names)}),"
                f" labels ({n},) and {n} case ids (and tumour types, z indices); got {seg_target.shape}, "
                f"{probs.shape}, {labels.shape}, {len(case_ids)} (and "
                f"{None if tumor_types is None else len(tumor_types)}, {None if z_all is None else z_all.size})")
        spacings = _spacings_per_slice(spacings_mm, case_ids)
        spacings_z = _spacings_z_per_slice(spacing_z_mm, case_ids)
        ids, index = _first_appearance(case_ids)
        for i, case_id in enumerate(ids):
            rows = np.flatnonzero(index == i)
            spacing, spacing_z = spacings[rows[0]], spacings_z[rows[0]]
            if any(spacings[r] != spacing for r in rows):
                found = sorted({spacings[r] for r in rows})
                raise ValueError(f"case {case_id}: its slices carry different spacings {found}")
            if any(spacings_z[r] != spacing_z for r in rows):
                raise ValueError(f"case {case_id}: its slices carry different slice spacings "
                                 f"{sorted({str(spacings_z[r]) for r in rows})}")
            case = self._cases.setdefault(case_id, _CaseSegmentation(seg_pred.shape[1:], spacing, spacing_z))
            if (case.shape_hw, case.spacing, case.spacing_z) != (seg_pred.shape[1:], spacing, spacing_z):
                raise ValueError(f"case {case_id}: slices of {seg_pred.shape[1:]} at {spacing} mm (slice spacing "
                                 f"{spacing_z}) after slices of {case.shape_hw} at {case.spacing} mm (slice spacing "
                                 f"{case.spacing_z})")
            seen = len(case.z_seen)
            z = z_all[rows] if z_all is not None else np.arange(seen, seen + rows.size)
            case.add(seg_pred[rows], seg_target[rows], z)
        self._probs.append(probs)
        self._labels.append(labels)
        self._gate_area.append(np.isin(seg_pred, self.gate_labels).sum(axis=(1, 2)))
        self._with_tumour.append((seg_target == TUMOUR_LABEL).any(axis=(1, 2)))
        self._case_ids.extend(str(c) for c in case_ids)
        self._tumor_types.extend([None] * n if tumor_types is None else [str(t) for t in tumor_types])

    def close(self, case_ids: Sequence[str]) -> None:
        """Compute the segmentation metrics of cases whose every slice has been added, and free their slices.
        Adding a slice to a closed case raises. Optional: ``case_rows`` computes whatever is still open."""
        for case_id in case_ids:
            self._cases[str(case_id)].metrics()

    def case_rows(self) -> list[dict]:
        """One row per case, in order of first appearance: ``case_id``, ``label`` (class name), ``tumor_type``, its
        segmentation metrics, ``missed_<region>`` (True where the reference holds the region and the prediction none
        of it; None where the reference has none), its class probabilities ``prob_<class>`` (pooled as
        :func:`case_probabilities`, weighted by the predicted gate region's area) and ``prob_all_<class>``
        (every slice)."""
        if not self._case_ids:
            raise ValueError("no slices were added: call update() before asking for metrics")
        probs, labels = np.concatenate(self._probs), np.concatenate(self._labels)
        ids, case_probs = case_probabilities(probs, self._case_ids, np.concatenate(self._gate_area))
        _, all_probs = case_probabilities(probs, self._case_ids)
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
            case = self._cases[case_id]
            row.update(case.metrics())
            for r, region in enumerate(REGIONS):
                reference, predicted = case.present(r)
                row[f"missed_{region}"] = (not predicted) if reference else None
            row.update({f"prob_{name}": float(p) for name, p in zip(self.class_names, case_probs[i])})
            row.update({f"prob_all_{name}": float(p) for name, p in zip(self.class_names, all_probs[i])})
            rows.append(row)
        return rows

    def summary(self, only: Sequence[str] | None = None) -> dict:
        """The flat metrics dict: :data:`METRIC_NAMES` first, then the extras (docs/metrics.md).

        Args:
            only: score these case ids only (e.g. one site's cases of a pooled evaluation); None = every case.
        """
        rows = self.case_rows()
        keep = np.ones(len(self._case_ids), dtype=bool)
        if only is not None:
            wanted = {str(c) for c in only}
            rows = [row for row in rows if row["case_id"] in wanted]
            keep = np.isin(np.asarray(self._case_ids), list(wanted))
            if not rows:
                raise ValueError(f"none of the {len(wanted)} case id(s) asked for were added")
        seg = summarize_cases([{k: v for k, v in row.items() if not k.startswith("prob_")} for row in rows])
        y_case = np.array([self.class_names.index(row["label"]) for row in rows])
        p_case = np.array([[row[f"prob_{name}"] for name in self.class_names] for row in rows])
        p_all = np.array([[row[f"prob_all_{name}"] for name in self.class_names] for row in rows])
        cls_case = classification_metrics(y_case, p_case, self.class_names)
        cls_all = classification_metrics(y_case, p_all, self.class_names)
        # Slice-level classification over the slices through the reference tumour: a tumour-free slice of a test
        # case has no type to show, whatever its case's label.
        probs, labels = np.concatenate(self._probs)[keep], np.concatenate(self._labels)[keep]
        through = np.concatenate(self._with_tumour)[keep]
        through = through if through.any() else np.ones_like(through)
        cls_slice = classification_metrics(labels[through], probs[through], self.class_names)

        out: dict = {**seg, **cls_case}
        out = {name: out[name] for name in METRIC_NAMES} | {k: v for k, v in out.items() if k not in METRIC_NAMES}
        for key in MEDIAN_KEYS:
            out[_median_name(key)] = float(np.median([row[key] for row in rows]))
        for region in REGIONS:
            flags = [row[f"missed_{region}"] for row in rows if row[f"missed_{region}"] is not None]
            out[f"miss_rate_{region}"] = float(np.mean(flags)) if flags else float("nan")
        # The paper's Table 1 reports tumour segmentation per tumour type.
        for tumor_type in dict.fromkeys(row["tumor_type"] for row in rows):
            means = summarize_cases([row for row in rows if row["tumor_type"] == tumor_type])
            for metric in ("dice", "iou", "hd95", "hd"):
                unit = "_mm" if metric.startswith("hd") else ""
                out[f"{metric}_tumor_{tumor_type}{unit}"] = means[f"{metric}_tumor{unit}"]
            out[f"n_cases_{tumor_type}"] = means["n_cases"]
        out.update({f"{k}_all_slices": cls_all[k] for k in ALL_SLICES_KEYS})
        out.update({f"slice_{k}": v for k, v in cls_slice.items()})
        out["n_slices"] = int(keep.sum())
        return out


def _median_name(key: str) -> str:
    """``dice_tumor`` -> ``dice_tumor_median``; ``hd95_tumor_mm`` -> ``hd95_tumor_median_mm`` (the unit stays last)."""
    return f"{key[:-3]}_median_mm" if key.endswith("_mm") else f"{key}_median"


def evaluation_summary(
    seg_pred,
    seg_target,
    slice_probs,
    labels,
    case_ids: Sequence[str],
    spacings_mm,
    class_names: Sequence[str],
    tumor_types: Sequence[str] | None = None,
    *,
    z_index=None,
    spacing_z_mm=None,
    gate_labels: Sequence[int] = (TUMOUR_LABEL,),
) -> tuple[dict, pd.DataFrame]:
    """All evaluation metrics of a set of slices in one call: per case, then summarised (see
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
        z_index: axial index per slice; None = the slices of a case are contiguous, in the order given.
        spacing_z_mm: slice spacing in mm (one value, N values or a mapping by case id); None = in-plane only.
        gate_labels: the labels of the region that gates the classifier (pools the case probabilities).

    Returns:
        ``(metrics, per_case)``. ``metrics`` is flat and JSON-serialisable: :data:`METRIC_NAMES` first (segmentation
        of tumour, edema and whole; case-level classification; ``n_cases``), then ``iou/hd95/hd`` of edema and whole,
        per class ``sensitivity_<c>, specificity_<c>, auc_<c>``, ``confusion_matrix``, medians of
        :data:`MEDIAN_KEYS`, ``miss_rate_<region>``, per tumour type ``dice/iou/hd95/hd_tumor_<type>`` and
        ``n_cases_<type>``, case-level classification with every slice pooled as ``<key>_all_slices``, and
        slice-level classification as ``slice_*``. ``per_case`` has one row per case
        (:meth:`EvaluationAccumulator.case_rows`).
    """
    acc = EvaluationAccumulator(class_names, gate_labels)
    acc.update(seg_pred, seg_target, slice_probs, labels, case_ids, spacings_mm, tumor_types, z_index=z_index,
               spacing_z_mm=spacing_z_mm)
    return acc.summary(), pd.DataFrame(acc.case_rows())


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _per_slice_from_cases(by_case: Mapping, case_ids: Sequence[str], name: str, check) -> list:
    """One checked value per slice from a mapping case id -> value (every case must have one)."""
    missing = sorted({str(c) for c in case_ids} - {str(k) for k in by_case})
    if missing:
        raise ValueError(f"{name} has no entry for case(s) {missing}")
    checked = {str(k): check(v) for k, v in by_case.items()}
    return [checked[str(c)] for c in case_ids]


def _spacings_z_per_slice(spacing_z_mm, case_ids: Sequence[str]) -> list[float | None]:
    if spacing_z_mm is None:
        return [None] * len(case_ids)
    if isinstance(spacing_z_mm, Mapping):
        return _per_slice_from_cases(spacing_z_mm, case_ids, "spacing_z_mm", _check_spacing_z)
    array = _to_numpy(spacing_z_mm).astype(float).reshape(-1)
    if array.size == 1:
        return [_check_spacing_z(array[0])] * len(case_ids)
    if array.size == len(case_ids):
        return [_check_spacing_z(v) for v in array]
    raise ValueError(f"spacing_z_mm must be one value, one per slice or a mapping by case id; got {array.size} "
                     f"values for {len(case_ids)} slices")


def _spacings_per_slice(spacings_mm, case_ids: Sequence[str]) -> list[tuple[float, float]]:
    if isinstance(spacings_mm, Mapping):
        return _per_slice_from_cases(spacings_mm, case_ids, "spacings_mm", _check_spacing)
    array = _to_numpy(spacings_mm).astype(float)
    if array.shape == (2,):
        return [_check_spacing(array)] * len(case_ids)
    if array.shape == (len(case_ids), 2):
        return [_check_spacing(row) for row in array]
    raise ValueError(f"spacings_mm must be one (rows, columns) pair, one pair per slice or a mapping by case id; "
                     f"got shape {array.shape} for {len(case_ids)} slices")
