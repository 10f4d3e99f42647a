"""``braintumnet import-brats`` on BraTS-layout folders written here: the releases' file names, label values and their
240×240×155 1 mm grid (BraTS' own affine), with simple synthetic volumes (no patient data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from braintumnet.cli import main as cli
from braintumnet.data.brats import hospitals_from_csv, import_brats, seeded_hospitals, train_test_split
from braintumnet.data.contract import EXTERNAL_SITE, SITES
from braintumnet.data.prepare import check_site, source_fingerprint
from braintumnet.data.site import load_site
from braintumnet.errors import BrainTumNetError
from simulation.pooled import split_pooled

SHAPE = (240, 240, 155)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # BraTS' LPS-stored 1 mm grid


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """One CE-T1 image and its segmentation in each labelling (2023: 1 NETC, 2 SNFH, 3 ET; 2021: 1, 2, 4 ET),
    written once; the cases below are copies under BraTS names."""
    root = tmp_path_factory.mktemp("brats-volumes")
    x, y, z = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    brain = ((x - 120) / 70.0) ** 2 + ((y - 120) / 85.0) ** 2 + ((z - 75) / 60.0) ** 2 <= 1
    lesion = (x - 100) ** 2 + (y - 130) ** 2 + (z - 80) ** 2
    image = np.where(brain, 400, 0).astype(np.int16)
    image[lesion <= 12 ** 2] = 900
    seg23 = np.zeros(SHAPE, np.uint8)
    seg23[lesion <= 20 ** 2] = 2  # SNFH
    seg23[lesion <= 12 ** 2] = 3  # ET (the ring)
    seg23[lesion <= 6 ** 2] = 1  # NETC (the core)
    seg21 = np.where(seg23 == 3, 4, seg23).astype(np.uint8)
    paths = {}
    for name, array in (("t1c", image), ("seg2023", seg23), ("seg2021", seg21)):
        paths[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, AFFINE), paths[name])
    paths["seg2023-float"] = root / "seg2023-float.nii.gz"  # BraTS 2023 ships some masks as floating point
    nib.save(nib.Nifti1Image(seg23.astype(np.float64), AFFINE), paths["seg2023-float"])
    return paths


def _case_2023(root: Path, volumes: dict, case_id: str, seg: str = "seg2023") -> None:
    folder = root / case_id
    folder.mkdir(parents=True)
    shutil.copy(volumes["t1c"], folder / f"{case_id}-t1c.nii.gz")
    if seg:
        shutil.copy(volumes[seg], folder / f"{case_id}-seg.nii.gz")
    for other in ("t1n", "t2w", "t2f"):  # the other sequences are there too, and are not read
        (folder / f"{case_id}-{other}.nii.gz").write_bytes(b"")


def _case_2021(root: Path, volumes: dict, case_id: str) -> None:
    folder = root / case_id
    folder.mkdir(parents=True)
    shutil.copy(volumes["t1c"], folder / f"{case_id}_t1ce.nii.gz")
    shutil.copy(volumes["seg2021"], folder / f"{case_id}_seg.nii.gz")


@pytest.fixture
def brats_2023(tmp_path, volumes) -> Path:
    """Four cases of each of BraTS-GLI, -MET and -MEN in their training folders, and one GLI validation case."""
    root = tmp_path / "brats"
    for collection in ("GLI", "MET", "MEN"):
        for i in range(4):
            _case_2023(root / f"ASNR-MICCAI-BraTS2023-{collection}-Challenge-TrainingData", volumes,
                       f"BraTS-{collection}-{i:05d}-000", seg="seg2023-float" if i == 0 else "seg2023")
    _case_2023(root / "ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData", volumes, "BraTS-GLI-09000-000", seg="")
    return root


def test_brats_2023_imports_into_a_folder_that_passes_check_and_splits_by_hospital(brats_2023, tmp_path, volumes):
    out = tmp_path / "site"
    sources = {p: p.stat().st_mtime_ns for p in brats_2023.rglob("*")}
    report = import_brats(brats_2023, out)

    checked = check_site(out, progress=False)
    assert checked.exit_code == 0, checked.summary()
    cases = pd.read_csv(out / "cases.csv", dtype=str)
    assert len(cases) == 12 and report.skipped == {"BraTS-GLI-09000-000": report.skipped["BraTS-GLI-09000-000"]}
    assert "validation" in report.skipped["BraTS-GLI-09000-000"] and report.exit_code == 3
    types = dict(zip(cases["case_id"], cases["tumor_type"]))
    assert types["BraTS-GLI-00001-000"] == "glioma" and types["BraTS-MET-00001-000"] == "metastasis"
    assert types["BraTS-MEN-00001-000"] == "meningioma"
    assert json.loads((out / "dataset.json").read_text())["tumor_types"] == ["glioma", "metastasis", "meningioma"]
    # tumour = ET + NETC, edema = SNFH, voxel for voxel, on the BraTS grid
    seg = np.asarray(nib.load(volumes["seg2023"]).dataobj)
    for case in ("BraTS-GLI-00000-000", "BraTS-MET-00002-000"):  # a float mask and an integer one
        mask = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert mask.shape == SHAPE and np.allclose(mask.affine, AFFINE)
        labels = np.asarray(mask.dataobj)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels == 1, np.isin(seg, (1, 3))) and np.array_equal(labels == 2, seg == 2)
    # the seeded split: every hospital has each type, train and test; external holds each type, all test
    assert set(cases["hospital"]) == {*SITES, EXTERNAL_SITE}
    for hospital, rows in cases.groupby("hospital"):
        assert set(rows["tumor_type"]) == {"glioma", "metastasis", "meningioma"}
        assert set(rows["split"]) == ({"test"} if hospital == EXTERNAL_SITE else {"train", "test"})
    again = seeded_hospitals(report.cases, 0, 0.2), train_test_split(report.cases, 0, 0.2)
    assert again == (cases["hospital"].tolist(), cases["split"].tolist())  # seeded: the same split every time
    assert {p: p.stat().st_mtime_ns for p in brats_2023.rglob("*")} == sources  # the BraTS folder is only read

    # python -m simulation --data OUT splits it by hospital; each hospital's folder reads its cases from there and
    # fingerprints them for its cache (which an absolute path outside the folder broke)
    layout = split_pooled(out, "hospital", tmp_path / "sites")
    assert set(layout.internal) == set(SITES) and layout.external == EXTERNAL_SITE
    plagh = tmp_path / "sites" / "plagh"
    assert check_site(plagh, progress=False).exit_code == 0
    assert source_fingerprint(load_site(plagh))


def test_brats_2021_labels_and_a_mask_of_another_scheme(tmp_path, volumes):
    root = tmp_path / "BraTS2021_Training_Data"
    for i in range(3):
        _case_2021(root, volumes, f"BraTS2021_{i:05d}")
    _case_2021(root, volumes, "BraTS2021_00099")
    shutil.copy(volumes["seg2023"], root / "BraTS2021_00099" / "BraTS2021_00099_seg.nii.gz")  # 3: not a 2021 label

    code = cli(["import-brats", str(root), str(tmp_path / "site")])
    assert code == 3  # some cases left out, like prepare's quarantine
    cases = pd.read_csv(tmp_path / "site" / "cases.csv", dtype=str)
    assert sorted(cases["case_id"]) == [f"BraTS2021_{i:05d}" for i in range(3)]
    assert set(cases["tumor_type"]) == {"glioma"}
    labels = np.asarray(nib.load(tmp_path / "site" / "labelsTr" / "BraTS2021_00000.nii.gz").dataobj)
    seg = np.asarray(nib.load(volumes["seg2021"]).dataobj)
    assert np.array_equal(labels == 1, np.isin(seg, (1, 4))) and np.array_equal(labels == 2, seg == 2)
    assert check_site(tmp_path / "site", progress=False).exit_code == 0


def test_institutions_csv_names_the_hospitals_and_the_external_one(tmp_path):
    cases = pd.DataFrame({"case_id": [f"BraTS-GLI-{i:05d}-000" for i in range(6)]})
    institutions = tmp_path / "institutions.csv"
    pd.DataFrame({"case_id": cases["case_id"], "site": ["Penn", "St. Mary's", "UCSF"] * 2}).to_csv(institutions,
                                                                                                   index=False)
    hospitals = hospitals_from_csv(cases, institutions, "site", external="UCSF")
    assert hospitals == ["Penn", "St._Mary_s", EXTERNAL_SITE] * 2
    with pytest.raises(BrainTumNetError, match="no case of institution 'MGH'"):
        hospitals_from_csv(cases, institutions, "site", external="MGH")


@pytest.mark.parametrize("problem, expected", [
    ("inside", "inside the BraTS folder"),
    ("exists", "never overwritten"),
    ("both-glioma-releases", "share their patients"),
    ("empty", "no BraTS case found"),
    ("institution-missing", "no institution for 1 case"),
])
def test_import_problems_are_one_line_naming_the_fix(brats_2023, tmp_path, volumes, capsys, problem, expected):
    out = tmp_path / "site"
    args = []
    if problem == "inside":
        out = brats_2023 / "site"
    if problem == "exists":
        out.mkdir()
        (out / "cases.csv").write_text("case_id\n")
    if problem == "both-glioma-releases":
        _case_2021(brats_2023 / "BraTS2021_Training_Data", volumes, "BraTS2021_00000")
    if problem == "institution-missing":
        ids = sorted(p.name for p in brats_2023.glob("*TrainingData/*"))[1:]
        pd.DataFrame({"case_id": ids, "institution": "Penn"}).to_csv(tmp_path / "i.csv", index=False)
        args = ["--institutions", str(tmp_path / "i.csv")]
    source = tmp_path / "nothing" if problem == "empty" else brats_2023
    source.mkdir(exist_ok=True)
    assert cli(["import-brats", str(source), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(BrainTumNetError):
        import_brats(source, out, institutions=tmp_path / "i.csv" if args else None)
