"""`braintumnet init`: an nnU-Net folder or a DICOM export in, dataset.json and cases.csv out, tumour type and split
left for the hospital to fill in (and `check` saying so), never a file overwritten."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from braintumnet.cli import main
from braintumnet.data.contract import CASES_COLUMNS

NNUNET_JSON = {"channel_names": {"0": "T1c"}, "labels": {"background": 0, "tumour": 1, "edema": 2},
               "numTraining": 2, "file_ending": ".nii.gz", "name": "Dataset501_Yibin"}


def _fill_in(root, tumor_types=("glioma", "metastasis"), splits=("train", "test")):
    cases = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
    cases["tumor_type"], cases["split"] = list(tumor_types), list(splits)
    cases.to_csv(root / "cases.csv", index=False)


def test_nnunet_folder_init_check_says_fill_in_then_passes(tiny_site, capsys, digest):
    site = tiny_site("Dataset501_Yibin").add("c001", seed=0).add("c002", seed=1)
    root = site.root
    (root / "dataset.json").write_text(json.dumps(NNUNET_JSON))  # nnU-Net v2's own file, kept as it is
    (root / "imagesTr/c001_0001.nii.gz").write_bytes(b"another channel, not read")
    before = digest(root / "imagesTr")

    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    assert "kept the existing dataset.json" in out and "still to fill in" in out
    cases = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
    assert list(cases.columns) == list(CASES_COLUMNS)
    assert cases[["case_id", "image", "mask"]].values.tolist() == [
        ["c001", "imagesTr/c001_0000.nii.gz", "labelsTr/c001.nii.gz"],
        ["c002", "imagesTr/c002_0000.nii.gz", "labelsTr/c002.nii.gz"]]
    assert (cases[["tumor_type", "split"]] == "").all().all()
    assert json.loads((root / "dataset.json").read_text()) == NNUNET_JSON and digest(root / "imagesTr") == before

    assert main(["check", str(root)]) == 2
    err = capsys.readouterr().err
    assert "cases.csv: fill in tumor_type (glioma, metastasis or meningioma) and split (train or test) on 2 of 2 " \
           "rows (lines 2, 3)" in err
    assert "unknown tumour type" not in err and "Traceback" not in err

    _fill_in(root)
    assert main(["check", str(root)]) == 0
    assert "2 usable, 0 quarantined" in capsys.readouterr().out


def test_dicom_export_one_case_per_series(tiny_site, capsys, caplog):
    site = tiny_site("hospital")
    site.add("p1", fmt="dicom", seed=0).add("p2", fmt="dicom", seed=1)
    root = site.root
    (root / "labelsTr/p2.nii.gz").unlink()  # its mask is still to draw
    export = root / "dicom"
    (export / "reports").mkdir()  # a non-MR object of the export is left out, and said so
    shutil.copy(get_testdata_file("test-SR.dcm"), export / "reports/SR.dcm")

    assert main(["init", str(root), "--from", str(export)]) == 0
    out = capsys.readouterr().out
    assert "1 found, 1 still to draw" in out and "1 SR (not MR)" in out
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["site"] == "hospital" and meta["modality"] == "CE-T1" and set(meta["labels"]) == {"0", "1", "2"}
    cases = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
    assert cases[["case_id", "image", "mask", "slice_thickness_mm", "series_description"]].values.tolist() == [
        ["p1", "dicom/p1", "labelsTr/p1.nii.gz", "2.0", "CE-T1"],
        ["p2", "dicom/p2", "labelsTr/p2.nii.gz", "2.0", "CE-T1"]]

    _fill_in(root)
    assert main(["check", str(root)]) == 3  # p1 usable; p2's missing mask named
    assert "case p2: labelsTr/p2.nii.gz: missing file" in caplog.text


@pytest.mark.parametrize("mistake, phrase", [
    ("cases.csv exists", "init never overwrites a file"),
    ("two series in one folder", "mixes 2 series"),
    ("export outside the site", "is outside the site folder"),
])
def test_mistakes_exit_2_and_leave_every_file_as_it_was(tiny_site, tmp_path, capsys, digest, mistake, phrase):
    site = tiny_site("hospital").add("p1", fmt="dicom", seed=0)
    root, source = site.root, site.root / "dicom"
    if mistake == "cases.csv exists":
        (root / "cases.csv").write_text("case_id,image,mask,tumor_type,split\n")
    elif mistake == "two series in one folder":
        site.add("p2", fmt="dicom", seed=1)
        for f in (root / "dicom/p2").iterdir():
            f.rename(root / "dicom/p1" / f"b_{f.name}")
    else:
        source = tmp_path / "elsewhere"
        shutil.copytree(root / "dicom", source)
    before = digest(root)

    assert main(["init", str(root), "--from", str(source)]) == 2
    assert phrase in capsys.readouterr().err
    assert digest(root) == before  # nothing written, nothing overwritten
