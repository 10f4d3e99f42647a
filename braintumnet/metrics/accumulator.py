"""Every evaluation metric of a set of slices: per case, then summarised over cases (docs/metrics.md).

:class:`EvaluationAccumulator` takes predictions batch by batch; :func:`evaluation_summary` does the same in one call.
The summary carries :data:`METRIC_NAMES` first, in that order, then the extras.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from braintumnet.labels import REGIONS, TUMOUR_LABEL
from braintumnet.metrics.classification import case_probabilities, classification_metrics, first_appearance
from braintumnet.metrics.segmentation import CaseSegmentation, check_labels, check_spacing, check_spacing_z

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
#: Segmentation keys whose median over cases is reported beside the mean (``<name>_median``, before any ``_mm``).
MEDIAN_KEYS = ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "dice_whole")
#: Case-level classification keys also reported with every slice of a case pooled (``<name>_all_slices``).
ALL_SLICES_KEYS = ("acc", "sensitivity", "specificity", "f1", "auc")


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
        self._cases: dict[str, CaseSegmentation] = {}
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._gate_area: list[np.ndarray] = []  # per slice: pixels of the gate region in the prediction
        self._with_tumour: list[np.ndarray] = []  # per slice: the reference holds tumour
        self._case_ids: list[str] = []
        self._tumor_types: list[str | None] = []

    def update(self, seg_pred, seg_target, slice_probs, labels, case_ids: Sequence[str], spacings_mm,
               tumor_types: Sequence[str] | None = None, *, z_index=None, spacing_z_mm=None) -> None:
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
        seg_pred, seg_target = check_labels("seg_pred", seg_pred), check_labels("seg_target", seg_target)
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
        ids, index = first_appearance(case_ids)
        for i, case_id in enumerate(ids):
            rows = np.flatnonzero(index == i)
            spacing, spacing_z = spacings[rows[0]], spacings_z[rows[0]]
            if any(spacings[r] != spacing for r in rows):
                found = sorted({spacings[r] for r in rows})
                raise ValueError(f"case {case_id}: its slices carry different spacings {found}")
            if any(spacings_z[r] != spacing_z for r in rows):
                raise ValueError(f"case {case_id}: its slices carry different slice spacings "
                                 f"{sorted({str(spacings_z[r]) for r in rows})}")
            case = self._cases.setdefault(case_id, CaseSegmentation(seg_pred.shape[1:], spacing, spacing_z))
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
        _, index = first_appearance(self._case_ids)
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


def evaluation_summary(seg_pred, seg_target, slice_probs, labels, case_ids: Sequence[str], spacings_mm,
                       class_names: Sequence[str], tumor_types: Sequence[str] | None = None, *, z_index=None,
                       spacing_z_mm=None, gate_labels: Sequence[int] = (TUMOUR_LABEL,)) -> tuple[dict, pd.DataFrame]:
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
        return _per_slice_from_cases(spacing_z_mm, case_ids, "spacing_z_mm", check_spacing_z)
    array = _to_numpy(spacing_z_mm).astype(float).reshape(-1)
    if array.size == 1:
        return [check_spacing_z(array[0])] * len(case_ids)
    if array.size == len(case_ids):
        return [check_spacing_z(v) for v in array]
    raise ValueError(f"spacing_z_mm must be one value, one per slice or a mapping by case id; got {array.size} "
                     f"values for {len(case_ids)} slices")


def _spacings_per_slice(spacings_mm, case_ids: Sequence[str]) -> list[tuple[float, float]]:
    if isinstance(spacings_mm, Mapping):
        return _per_slice_from_cases(spacings_mm, case_ids, "spacings_mm", check_spacing)
    array = _to_numpy(spacings_mm).astype(float)
    if array.shape == (2,):
        return [check_spacing(array)] * len(case_ids)
    if array.shape == (len(case_ids), 2):
        return [check_spacing(row) for row in array]
    raise ValueError(f"spacings_mm must be one (rows, columns) pair, one pair per slice or a mapping by case id; "
                     f"got shape {array.shape} for {len(case_ids)} slices")
