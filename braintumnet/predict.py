"""``braintumnet predict``: a new scan in, its mask in the scan's own geometry, tumour type, volumes and a report out.

For each case (a NIfTI file, a DICOM series folder, or every case of a folder):

1. ``braintumnet.inference`` reads the scan into the canonical grid, prepares every axial slice inside the head as
   training prepares slices, segments and classifies them (with ``tta``, averaged over flips) and maps the labels
   back to the scan's own voxel grid, shape and affine (its steps 1-4).
2. Case-level tumour type: the mean of the slice class probabilities weighted by the area of the region that gates
   the classifier (tumour by default; ``gate_region`` of the checkpoint) in each slice's predicted mask, or the plain
   mean over all its slices inside the head if it predicts none (``braintumnet.metrics.case_probabilities``, the
   evaluation's own pooling). Slices without that region show the classifier an empty gate and carry no evidence; a
   false-positive speck counts by its few pixels, a slice through the tumour by its whole extent.
3. Volumes in millilitres: voxel count × the voxel volume from the affine.

Outputs, in ``out_dir``, per case ``<case>_mask.nii.gz`` (uint8, 1 tumour, 2 edema), ``<case>.json`` (the summary),
``<case>_report.png`` (one page) and, for DICOM input, ``<case>_image.nii.gz`` (the series as NIfTI, for viewers
that want both files in one format); and ``predictions.csv`` with one row per case.
"""

from __future__ import annotations

import logging
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from braintumnet.checkpoint import load_model, task_of
from braintumnet.data.contract import CASES_CSV, EDEMA_LABEL, TUMOUR_LABEL
from braintumnet.data.readers import Volume
from braintumnet.data.site import case_id_problem, load_site
from braintumnet.engine import pick_device
from braintumnet.errors import EXIT_DATA_PROBLEMS, BrainTumNetError
from braintumnet.inference import VolumePrediction, predict_volume, read_case, write_mask
from braintumnet.postprocess import with_rule
from braintumnet.io import atomic_write_json
from braintumnet.labels import REGIONS
from braintumnet.metrics import case_probabilities
from braintumnet.report import plots

log = logging.getLogger("braintumnet.predict")

NOT_FOR_CLINICAL_USE = ("Research software, not a medical device: not for clinical use. The mask, type and volumes "
                        "are model outputs that no clinician has checked.")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
REPORT_SLICES = 3


class SomeCasesFailed(BrainTumNetError):
    """Batch mode: the other cases were predicted (their summaries are in ``results``); some could not be, and each
    was logged with its fix."""

    exit_code = EXIT_DATA_PROBLEMS

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: its name (used for the output files) and its NIfTI file or DICOM series folder."""

    case: str
    path: Path


def predict(model_path: Path, input_path: Path, out_dir: Path, *, tta: bool = False, device: str = "auto",
            progress: bool = True, task: str | None = None, postprocess: str | None = None) -> list[dict]:
    """Predict every case of ``input_path`` and write the outputs into ``out_dir``.

    Args:
        model_path: a BrainTumNet checkpoint.
        input_path: a NIfTI file (``.nii``/``.nii.gz``), a DICOM series folder, or a folder of cases: its NIfTI files
            and DICOM series subfolders, or, if it holds a ``cases.csv``, the images that file lists (a site folder).
        out_dir: the output folder (created).
        tta: average over the four flips of each slice (4× the compute).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: progress bars.
        task: the task the caller expects (``3class``/``binary``); a checkpoint of another task is refused.
        postprocess: the post-processing rule (``braintumnet.postprocess``); None = the checkpoint's own
            ``model.postprocess``. Each summary records the rule used.

    Returns:
        One summary dict per case (the content of ``<case>.json``).

    Raises:
        BrainTumNetError: a missing or unreadable input, a bad checkpoint; ``SomeCasesFailed`` in batch mode when
            some cases could not be predicted (the others are written, and their summaries are in the exception's
            ``results``).

    Examples::

        predict(Path("runs/quick/model.pt"), Path("scans/c001.nii.gz"), Path("pred"))
    """
    input_path, out_dir = Path(input_path), Path(out_dir).absolute()
    cases = find_inputs(input_path)
    dev = pick_device(device)
    model, ckpt = load_model(model_path, dev, task=task)
    profile = with_rule(ckpt.profile, postprocess)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ckpt.meta.get("synthetic"):
        log.warning("%s was trained on SYNTHETIC data (the phantom cohort): its masks and tumour types show that the "
                    "pipeline runs, they mean nothing about a patient", model_path)
    context = {
        "model": str(Path(model_path).absolute()),
        "synthetic_training": ckpt.meta.get("synthetic"),
        "task": task_of(ckpt.class_names),
        "class_names": list(ckpt.class_names),
    }
    batch = len(cases) > 1 or input_path.is_dir() and not _is_series(input_path)
    results, failed = [], []
    with logging_redirect_tqdm() if progress else nullcontext():
        for case in tqdm(cases, desc="predict", unit="case", disable=not (progress and batch)):
            try:
                results.append(predict_case(model, profile, case, out_dir, context, tta=tta, device=dev,
                                            progress=progress and not batch))
            except BrainTumNetError as exc:
                if not batch:
                    raise
                log.error("%s", exc)
                failed.append({"case": case.case, "input": str(case.path), "error": str(exc)})
    _write_table(out_dir / "predictions.csv", results, failed, ckpt.class_names)
    if failed:
        raise SomeCasesFailed(f"{len(failed)} of {len(cases)} case(s) could not be predicted (logged above; listed "
                              f"in {out_dir / 'predictions.csv'}); fix or remove them and run again", results)
    return results


def find_inputs(path: Path) -> list[CaseInput]:
    """The cases of ``path``, in name order (see ``predict``).

    Raises:
        BrainTumNetError: a missing path, a file that is not NIfTI, a folder with no case in it.
    """
    path = Path(path)
    if not path.exists():
        raise BrainTumNetError(f"{path}: no such file or folder; give a NIfTI file (.nii or .nii.gz), a DICOM series "
                               "folder, or a folder of cases")
    if path.is_file():
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise BrainTumNetError(f"{path}: not a NIfTI file (.nii or .nii.gz); for a DICOM series give the folder "
                                   "that holds its files, not one file")
        return [CaseInput(_case_name(path), path)]
    if (path / CASES_CSV).is_file():
        site = load_site(path)
        for row in site.cases.itertuples():
            problem = case_id_problem(row.case_id) if row.case_id else "a row has no case_id: fill it in"
            if problem:
                raise BrainTumNetError(f"{path / CASES_CSV}: line {row.row}: {problem}")
        return [CaseInput(row.case_id, path / row.image) for row in site.cases.itertuples()]
    if _is_series(path):
        return [CaseInput(path.name, path)]
    found = [CaseInput(_case_name(p), p) for p in sorted(path.iterdir())
             if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(NIFTI_SUFFIXES))]
    if not found:
        raise BrainTumNetError(f"{path}: holds no NIfTI file and no DICOM series folder; give a scan, or a folder "
                               "of scans")
    names = [c.case for c in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BrainTumNetError(f"{path}: several inputs would be case {dupes[0]} (e.g. {dupes[0]}.nii.gz and a folder "
                               f"{dupes[0]}/); rename one so each case has its own name")
    return found


def predict_case(model, profile, case: CaseInput, out_dir: Path, context: dict, *, tta: bool,
                 device: torch.device, progress: bool = False) -> dict:
    """Predict one case and write its mask, summary and report. Returns the summary.

    Raises:
        BrainTumNetError: a case name that is no plain file name (its outputs would land outside ``out_dir``), or the
            scan's problem (``read_case``).
    """
    if not case.case or case.case in (".", "..") or any(c in case.case for c in "/\\\0"):
        raise BrainTumNetError(f"{case.path}: case name {case.case!r} would put its outputs outside {out_dir}; name "
                               "the case with letters, digits, _ - . only")
    started = time.perf_counter()
    volume, to_input, input_shape, input_affine = read_case(case.path)
    pred = predict_volume(model, profile.data, volume, postprocess=profile.model.postprocess, tta=tta, device=device,
                          progress=progress)
    class_names = context["class_names"]
    # On the scan's grid, not the model's: a prediction in the crop's padding is no lesion (and is not in the mask).
    area = np.isin(pred.labels, REGIONS[profile.model.gate_region]).sum(axis=(0, 1))
    gate = area > 0
    used = gate if gate.any() else pred.scored
    _, probs = case_probabilities(pred.slice_probs[pred.scored], [case.case] * int(pred.scored.sum()),
                                  area[pred.scored])
    probs = probs[0]
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0

    mask_path = out_dir / f"{case.case}_mask.nii.gz"
    write_mask(pred.labels, to_input, input_shape, input_affine, case.path, mask_path)
    summary = {
        "case": case.case,
        "input": str(case.path.absolute()),
        "mask": str(mask_path),
        "tumor_type": class_names[int(np.argmax(probs))],
        "probabilities": {name: round(float(p), 4) for name, p in zip(class_names, probs)},
        "type_from": f"mean over the {int(used.sum())} slice(s) with predicted {profile.model.gate_region}, "
                     f"weighted by its area"
        if gate.any() else f"mean over all {int(used.sum())} slices, as no {profile.model.gate_region} was predicted",
        "volume_tumor_ml": round(float((pred.labels == TUMOUR_LABEL).sum()) * voxel_ml, 3),
        "volume_edema_ml": round(float((pred.labels == EDEMA_LABEL).sum()) * voxel_ml, 3),
        "n_slices": int(pred.labels.shape[2]),
        "shape": list(input_shape),
        "voxel_mm": [round(float(s), 4) for s in volume.spacing],
        "tta": tta,
        "postprocess": profile.model.postprocess,
        **{k: context[k] for k in ("model", "synthetic_training", "task")},
        "note": NOT_FOR_CLINICAL_USE,
    }
    if case.path.is_dir():  # DICOM: the series itself as NIfTI, on the mask's grid
        image_path = out_dir / f"{case.case}_image.nii.gz"
        nib.save(nib.Nifti1Image(volume.array, volume.affine), image_path)
        summary["image"] = str(image_path)
    summary["report"] = str(write_report(out_dir / f"{case.case}_report.png", summary, volume, pred))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / f"{case.case}.json", summary)
    log.info("%s: %s (p=%.2f), tumour %.1f mL, edema %.1f mL -> %s", case.case, summary["tumor_type"],
             float(probs.max()), summary["volume_tumor_ml"], summary["volume_edema_ml"], mask_path)
    return summary


def write_report(path: Path, summary: dict, volume: Volume, pred: VolumePrediction) -> Path:
    """The one-page PNG: the slices with the most predicted tumour, the probabilities, the volumes."""
    chosen = _report_slices(pred.labels, volume.spacing[2])
    sx, sy = (float(s) for s in volume.spacing[:2])
    areas = [(pred.labels[:, :, z] == TUMOUR_LABEL).sum() * sx * sy / 100.0 for z in chosen]
    probs = summary["probabilities"]
    top = summary["tumor_type"]
    lines = [
        *textwrap.wrap(f"input: {summary['input']}", 90, subsequent_indent="       "),
        *textwrap.wrap(f"mask:  {summary['mask']}", 90, subsequent_indent="       "),
        "",
        f"tumour type: {top}, probability {probs[top]:.2f}",
        f"  ({summary['type_from']})",
        f"tumour volume: {summary['volume_tumor_ml']:.2f} mL    edema volume: {summary['volume_edema_ml']:.2f} mL",
        f"{summary['n_slices']} axial slices, voxel {' x '.join(f'{v:g}' for v in summary['voxel_mm'])} mm"
        f"{', flip TTA' if summary['tta'] else ''}",
        "",
        *textwrap.wrap(f"model: {summary['model']}", 90, subsequent_indent="       "),
        f"trained on synthetic data: {_yes_no(summary['synthetic_training'])}",
        "",
        *textwrap.wrap(summary["note"], 90),
    ]
    return plots.case_report(
        path,
        images=[_display(volume.array[:, :, z]) for z in chosen],
        preds=[_display(pred.labels[:, :, z]) for z in chosen],
        slice_titles=[f"slice z={z}, tumour {a:.1f} cm²" for z, a in zip(chosen, areas)],
        heading=f"BrainTumNet prediction: {summary['case']}"
                + (" (MODEL TRAINED ON SYNTHETIC DATA)" if summary["synthetic_training"] else ""),
        lines=lines,
        probabilities=probs,
        aspect=sy / sx,
    )


def _report_slices(labels: np.ndarray, spacing_z: float, n: int = REPORT_SLICES, gap_mm: float = 5.0) -> list[int]:
    """Up to ``n`` slices by decreasing predicted tumour area (whole lesion if no tumour), at least ``gap_mm`` apart
    so the page does not show three near-identical neighbours; the middle slice if nothing was predicted."""
    area = (labels == TUMOUR_LABEL).sum(axis=(0, 1))
    if not area.any():
        area = (labels > 0).sum(axis=(0, 1))
    if not area.any():
        return [labels.shape[2] // 2]
    gap = max(1, int(np.ceil(gap_mm / max(float(spacing_z), 1e-6))))
    chosen: list[int] = []
    for z in np.argsort(-area, kind="stable"):
        if area[z] == 0 or len(chosen) == n:
            break
        if all(abs(int(z) - c) >= gap for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """A canonical ``(X, Y)`` slice in display order: rows anterior to posterior, columns the patient's left to right
    (what ``preprocess_case`` makes of a slice, at the scan's own resolution)."""
    return np.flip(np.asarray(slice_xy).T, axis=0)


def _write_table(path: Path, results: list[dict], failed: list[dict], class_names) -> None:
    rows = [{"case": r["case"], "tumor_type": r["tumor_type"],
             **{f"p_{name}": r["probabilities"][name] for name in class_names},
             "volume_tumor_ml": r["volume_tumor_ml"], "volume_edema_ml": r["volume_edema_ml"],
             "mask": r["mask"], "report": r["report"], "input": r["input"], "error": ""} for r in results]
    rows += [{"case": f["case"], "input": f["input"], "error": f["error"]} for f in failed]
    pd.DataFrame(rows).to_csv(path, index=False)


def _case_name(path: Path) -> str:
    """``c001.nii.gz`` -> ``c001``; nnU-Net's channel suffix goes too (``imagesTr/c001_0000.nii.gz`` -> ``c001``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            return name[: -len("_0000")] if name.endswith("_0000") and len(name) > 5 else name
    return name


def _is_series(folder: Path) -> bool:
    """A folder of files only, none of them NIfTI: a DICOM series (the reader checks the rest)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_file() and not p.name.lower().endswith(NIFTI_SUFFIXES) for p in entries)


def _yes_no(value) -> str:
    return "unknown (the checkpoint does not say)" if value is None else ("yes" if value else "no")
