"""Tiny site folders for the data tests: 40×48×30-voxel heads with one lesion, written as NIfTI or DICOM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from braintumnet.config import DataConfig
from braintumnet.data.dicom_io import write_dicom_series

SHAPE = (40, 48, 30)
SPACING = (1.0, 1.0, 2.0)


def tiny_case(seed: int = 0, shape=SHAPE, lesion=(22, 26, 15)) -> tuple[np.ndarray, np.ndarray]:
    """An integer-valued head (ellipsoid ~100, noise) with a bright tumour (label 1) inside edema (label 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    centre = (np.array(shape) - 1) / 2
    head = (((grid - centre) / (np.array(shape) * 0.42)) ** 2).sum(-1) <= 1
    distance = np.linalg.norm((grid - np.array(lesion)) * np.array(SPACING), axis=-1)
    mask = np.where(distance <= 5, 1, np.where(distance <= 9, 2, 0)).astype(np.uint8) * head
    image = np.where(head, 100.0, 2.0) + rng.normal(0, 3, shape)
    image[mask == 1], image[mask == 2] = 180 + rng.normal(0, 3, (mask == 1).sum()), 70
    return np.rint(np.clip(image, 0, None)).astype(np.float32), mask


def default_affine(spacing=SPACING) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * spacing / 2
    return affine


class TinySite:
    """Builds a site folder case by case; ``write()`` then writes dataset.json and cases.csv."""

    def __init__(self, root: Path, name: str = "yibin"):
        self.root, self.name, self.rows = root, name, []
        for sub in ("imagesTr", "labelsTr", "dicom"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, case_id: str, tumor_type: str = "glioma", split: str = "train", *, image=None, mask=None,
            affine=None, mask_affine=None, fmt: str = "nifti", seed: int = 0, **extra) -> "TinySite":
        if image is None or mask is None:
            image, mask = tiny_case(seed)
        affine = default_affine() if affine is None else affine
        mask_path = f"labelsTr/{case_id}.nii.gz"
        nib.save(nib.Nifti1Image(mask, affine if mask_affine is None else mask_affine), self.root / mask_path)
        if fmt == "dicom":
            image_path = f"dicom/{case_id}"
            write_dicom_series(image, affine, self.root / image_path, patient_id=case_id, seed=seed)
        else:
            image_path = f"imagesTr/{case_id}_0000.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), self.root / image_path)
        self.rows.append(dict(case_id=case_id, image=image_path, mask=mask_path, tumor_type=tumor_type, split=split,
                              **extra))
        return self

    def write(self, **dataset) -> Path:
        meta = {"site": self.name, "modality": "CE-T1",
                "labels": {"0": "background", "1": "tumour (enhancing + necrotic core)", "2": "peritumoral edema"},
                "tumor_types": ["glioma", "metastasis", "meningioma"], "synthetic": True, **dataset}
        (self.root / "dataset.json").write_text(json.dumps(meta, indent=2))
        pd.DataFrame(self.rows).to_csv(self.root / "cases.csv", index=False)
        return self.root


@pytest.fixture(scope="session")
def tiny_site_class():
    """``TinySite(root, name)``, for module-scoped fixtures that cannot use ``tiny_site``."""
    return TinySite


@pytest.fixture
def tiny_site(tmp_path):
    """``tiny_site(name="yibin") -> TinySite`` in a fresh folder under tmp_path."""
    return lambda name="yibin": TinySite(tmp_path / "sites" / name, name)


@pytest.fixture(name="tiny_case", scope="session")
def tiny_case_fixture():
    """``tiny_case(seed=0, shape=SHAPE, lesion=(22, 26, 15)) -> (image, mask)``."""
    return tiny_case


@pytest.fixture
def data_cfg() -> DataConfig:
    return DataConfig(img_size=32, slices_per_case=4, fov_mm=48.0)


def folder_digest(root: Path) -> str:
    """Hash of every path, byte and modification time under ``root``: any write changes it."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes() + str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.fixture
def digest():
    return folder_digest
