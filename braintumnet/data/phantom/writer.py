"""Phantom cases and site files in the site data contract (docs/data.md): byte-identical for the same seed.

A site folder holds ``dataset.json``, ``cases.csv``, ``imagesTr/{case}_0000.nii.gz`` (or a DICOM series folder
``dicom/{case}/``) and ``labelsTr/{case}.nii.gz``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from braintumnet.data.contract import CASES_COLUMNS, CASES_CSV, DATASET_JSON, LABELS, MODALITY, SCANNER_COLUMNS
from braintumnet.data.phantom.render import RenderedCase

FORMATS = ("nifti", "dicom")
GZIP_LEVEL = 1  # as nibabel's default: level 6 is only ~2 % smaller on noisy int16 and 4x slower
DESCRIPTION = ("synthetic phantom made by braintumnet.data.phantom (MNI152 anatomy, drawn tumours, simulated "
               "scanner): NOT patient data")


def image_path(case_id: str, fmt: str) -> str:
    """The image's path relative to the site folder, as ``cases.csv`` gives it."""
    return f"dicom/{case_id}" if fmt == "dicom" else f"imagesTr/{case_id}_0000.nii.gz"


def mask_path(case_id: str) -> str:
    return f"labelsTr/{case_id}.nii.gz"


def write_case(site_dir: Path, case_id: str, case: RenderedCase, fmt: str, seed: int) -> int:
    """Write one case's image and mask; returns the bytes written."""
    site_dir = Path(site_dir)
    slope = case.profile.rescale_slope
    if fmt == "dicom":
        from braintumnet.data.dicom_io import write_dicom_series

        folder = site_dir / image_path(case_id, fmt)
        # The stored integers and slope are passed through unchanged: stored = value / slope is exact.
        write_dicom_series(case.image.astype(np.float64), case.affine, folder, patient_id=case_id,
                           rescale_slope=slope, field_strength_t=case.profile.field_strength_t,
                           manufacturer=case.profile.manufacturer, seed=seed)
        size = sum(p.stat().st_size for p in folder.iterdir())
    else:
        size = write_nifti(site_dir / image_path(case_id, fmt), case.stored, case.affine, slope=slope)
    return size + write_nifti(site_dir / mask_path(case_id), case.mask, case.affine)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, slope: float = 1.0) -> int:
    """Write a ``.nii.gz`` deterministically: no timestamp in the gzip header (mtime 0), none in the NIfTI header.

    nibabel's own ``.nii.gz`` writer takes the gzip mtime from the clock in some versions; compressing the
    in-memory NIfTI bytes ourselves with ``mtime=0`` makes the file depend on the data only.
    """
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_xyzt_units("mm")
    hdr.set_qform(affine, code=1)  # scanner coordinates, as dcm2niix writes
    hdr.set_sform(affine, code=1)
    hdr["descrip"] = b"BrainTumNet-FL synthetic phantom"
    if slope != 1.0:
        hdr.set_slope_inter(slope, 0.0)
    raw = gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return len(raw)


def write_site_files(site_dir: Path, site: str, plan: pd.DataFrame, fmt: str) -> None:
    """``dataset.json`` and ``cases.csv`` for one site, from its rows of the cohort plan."""
    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "site": site,
        "modality": MODALITY,
        "labels": {str(k): v for k, v in LABELS.items()},
        "tumor_types": sorted(plan["tumor_type"].unique().tolist()),
        "synthetic": True,
        "description": DESCRIPTION,
    }
    (site_dir / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    cases = pd.DataFrame({
        "case_id": plan["case_id"],
        "image": [image_path(c, fmt) for c in plan["case_id"]],
        "mask": [mask_path(c) for c in plan["case_id"]],
        "tumor_type": plan["tumor_type"],
        "split": plan["split"],
        **{c: plan[c] for c in SCANNER_COLUMNS},
    })
    cases[[*CASES_COLUMNS, *SCANNER_COLUMNS]].to_csv(site_dir / CASES_CSV, index=False, lineterminator="\n")
