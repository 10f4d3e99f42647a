"""Each bad-input kind gives one line naming the case, the file and the problem; the rest of the site prepares."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from braintumnet.config import DataConfig
from braintumnet.data.cache import load_prepared
from braintumnet.data.dicom_io import write_dicom_series
from braintumnet.data.prepare import StrictFailure, check_site, prepare_site
from braintumnet.errors import EXIT_DATA_PROBLEMS, EXIT_NOTHING_USABLE

# kind -> (case id, the file the message names, a key phrase of the message)
EXPECTED = {
    "unreadable": ("unreadable", "imagesTr/unreadable_0000.nii.gz", "cannot be read"),
    "truncated": ("truncated", "imagesTr/truncated_0000.nii.gz", "truncated"),
    "nan": ("nan", "imagesTr/nan_0000.nii.gz", "NaN or Inf"),
    "geometry": ("geometry", "labelsTr/geometry.nii.gz", "geometry mismatch"),
    "mask values": ("badlabels", "labelsTr/badlabels.nii.gz", "mask values outside {0, 1, 2}: 3"),
    "empty tumour": ("empty", "labelsTr/empty.nii.gz", "empty tumour mask"),
    "unknown type": ("pituitary", "cases.csv", "unknown tumour type 'pituitary'"),
    "duplicate id": ("dup", "cases.csv", "duplicate case id"),
    "missing file": ("missing", "imagesTr/missing_0000.nii.gz", "missing file"),
    "4-D image": ("fourd", "imagesTr/fourd_0000.nii.gz", "4-D image"),
    "two series": ("twoseries", "dicom/twoseries", "mixes 2 series"),
    "truncated DICOM": ("dcmcut", "dicom/dcmcut/IM0003.dcm", "truncated"),
    # Damaged headers: each crashed the whole site's check with a traceback or a bare "could not convert" line.
    "zero sform row": ("zerosform", "imagesTr/zerosform_0000.nii.gz", "zero axis"),
    "NaN sform": ("nansform", "imagesTr/nansform_0000.nii.gz", "NaN or Inf in the header's sform/qform"),
    "DICOM without Rows": ("norows", "dicom/norows/IM0000.dcm", "lacks Rows"),
    "text orientation": ("textiop", "dicom/textiop/IM0000.dcm", "ImageOrientationPatient is 'a\\b\\c"),
    "text slope": ("textslope", "dicom/textslope/IM0000.dcm", "RescaleSlope is 'abc', not a number"),
    # A case id names predict's output files: one with a path in it would write outside the output folder.
    "path as case id": ("../../x/config", "cases.csv", "must be a plain name"),
}
GOOD = ("good1", "good2", "good3")


def _build(site, tiny_case):
    """A site with three good cases and one case of each bad kind."""
    root = site.root
    for i, case_id in enumerate(GOOD):
        site.add(case_id, ("glioma", "metastasis", "meningioma")[i], seed=i)
    site.add("unreadable")
    (root / "imagesTr/unreadable_0000.nii.gz").write_bytes(b"this is not an image")
    site.add("truncated")
    data = (root / "imagesTr/truncated_0000.nii.gz").read_bytes()
    (root / "imagesTr/truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    image, mask = tiny_case()
    site.add("nan", image=np.where(mask == 1, np.nan, image).astype(np.float32), mask=mask)
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[:3, 3] = -np.array(image.shape) * [1.0, 1.0, 2.0] / 2 + [2.0, 0, 0]
    site.add("geometry", mask_affine=shifted)
    site.add("badlabels", image=image, mask=np.where(mask == 2, 3, mask).astype(np.uint8))
    site.add("empty", image=image, mask=np.where(mask == 1, 2, mask).astype(np.uint8))
    site.add("pituitary", "pituitary")
    site.add("dup").add("dup", split="test")
    site.add("missing")
    (root / "imagesTr/missing_0000.nii.gz").unlink()
    site.add("fourd")
    four_d = nib.Nifti1Image(np.stack([image, image], axis=-1), nib.load(root / "labelsTr/fourd.nii.gz").affine)
    nib.save(four_d, root / "imagesTr/fourd_0000.nii.gz")
    site.add("twoseries", fmt="dicom")
    other = root.parent / "other_series"
    write_dicom_series(image, site_affine(root), other, patient_id="twoseries", series_description="T2")
    for f in sorted(other.iterdir())[:3]:
        shutil.copy(f, root / "dicom/twoseries" / f"T2_{f.name}")
    site.add("dcmcut", fmt="dicom")
    cut = root / "dicom/dcmcut/IM0003.dcm"
    cut.write_bytes(cut.read_bytes()[:-500])
    site.add("zerosform")
    _set_sform(root / "imagesTr/zerosform_0000.nii.gz", "srow_y", [0.0, 0.0, 0.0, -24.0])
    site.add("nansform")
    _set_sform(root / "imagesTr/nansform_0000.nii.gz", "srow_x", [np.nan, 0.0, 0.0, -20.0])
    site.add("norows", fmt="dicom")
    for f in sorted((root / "dicom/norows").iterdir()):
        ds = pydicom.dcmread(f)
        del ds.Rows
        ds.save_as(f)
    site.add("textiop", fmt="dicom")
    _overwrite_dicom_value(root / "dicom/textiop", "ImageOrientationPatient", "a\\b\\c\\d\\e\\f")
    site.add("textslope", fmt="dicom")
    _overwrite_dicom_value(root / "dicom/textslope", "RescaleSlope", "abc")
    site.rows.append({**site.rows[0], "case_id": "../../x/config"})  # good1's files under an unsafe id
    return site.write()


def _set_sform(path, row, values):
    """Rewrite a NIfTI's sform row as a broken converter does (the qform off, so the sform is the geometry)."""
    image = nib.load(path)
    header = image.header.copy()
    header[row] = values
    header["qform_code"], header["sform_code"] = 0, 1
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), path)


def _overwrite_dicom_value(folder, keyword, text):
    """Put ``text`` into each file's ``keyword`` value bytes in place (pydicom refuses to write a non-numeric DS)."""
    for f in sorted(folder.iterdir()):
        element = pydicom.dcmread(f).get_item(keyword)
        data = bytearray(f.read_bytes())
        data[element.value_tell:element.value_tell + element.length] = text.ljust(element.length).encode()
        f.write_bytes(bytes(data))


def site_affine(root):
    return nib.load(root / "labelsTr/good1.nii.gz").affine


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory, tiny_site_class, tiny_case):
    """Built once for the module: every test reads it, none writes to it."""
    return _build(tiny_site_class(tmp_path_factory.mktemp("bad") / "yibin"), tiny_case)


@pytest.fixture(scope="module")
def prepared(bad_site, tmp_path_factory):
    cfg = DataConfig(img_size=32, slices_per_case=4, fov_mm=48.0)
    return prepare_site(bad_site, tmp_path_factory.mktemp("cache"), cfg, progress=False)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_kind_names_case_file_and_problem(prepared, kind):
    case_id, path, phrase = EXPECTED[kind]
    found = [p for p in prepared.problems if p.case_id == case_id]
    assert len(found) == 1, [str(p) for p in prepared.problems]
    assert found[0].path == path and phrase in found[0].problem
    assert str(found[0]).startswith(f"case {case_id}: {path}: ") and "\n" not in str(found[0])
    quarantine = pd.read_csv(prepared.cache_dir / "quarantine.csv", dtype=str, keep_default_na=False)
    row = quarantine[quarantine["case_id"] == case_id]
    assert len(row) == 1 and row["path"].item() == path and phrase in row["problem"].item()


def test_rest_of_the_site_prepares(prepared):
    assert prepared.exit_code == EXIT_DATA_PROBLEMS and not prepared.reused
    assert sorted(prepared.usable["case_id"]) == list(GOOD)
    assert prepared.n_quarantined == len(EXPECTED) + 1  # the duplicate id has two rows
    site = load_prepared(prepared.cache_dir)
    assert sorted(site.cases()["case_id"]) == list(GOOD) and site.images.shape[0] == 3 * 4
    assert "quarantined" in prepared.summary() and "quarantine.csv" in prepared.summary()


def test_check_logs_one_line_per_problem(bad_site, caplog):
    with caplog.at_level(logging.WARNING, logger="braintumnet.data"):
        report = check_site(bad_site, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "braintumnet.data"]
    assert len(lines) == len(EXPECTED) and all("\n" not in line for line in lines)
    for case_id, path, phrase in EXPECTED.values():
        assert any(line.startswith(f"case {case_id}: {path}: ") and phrase in line for line in lines)
    assert report.exit_code == EXIT_DATA_PROBLEMS and len(report.usable) == len(GOOD)


def test_strict_makes_any_problem_fatal(bad_site, data_cfg, tmp_path, digest):
    before = digest(bad_site)
    with pytest.raises(StrictFailure, match="strict") as caught:
        prepare_site(bad_site, tmp_path / "cache", data_cfg, strict=True, progress=False)
    assert caught.value.exit_code == EXIT_DATA_PROBLEMS
    assert not (tmp_path / "cache" / "yibin").exists() or not any((tmp_path / "cache" / "yibin").iterdir())
    assert digest(bad_site) == before


def test_strict_refuses_a_reused_cache_with_quarantined_cases(bad_site, prepared, data_cfg):
    assert prepare_site(bad_site, prepared.cache_dir.parents[1], data_cfg, progress=False).reused
    with pytest.raises(StrictFailure):
        prepare_site(bad_site, prepared.cache_dir.parents[1], data_cfg, strict=True, progress=False)


def test_nothing_usable(tiny_site, data_cfg, tmp_path):
    site = tiny_site().add("only", "pituitary")
    report = prepare_site(site.write(), tmp_path / "cache", data_cfg, progress=False)
    assert report.exit_code == EXIT_NOTHING_USABLE and report.n_slices == 0
    assert load_prepared(report.cache_dir).images.shape == (0, 32, 32)
    assert "0 usable" in report.summary()


def test_too_few_slices_for_the_setting(tiny_site, tiny_case, tmp_path):
    image, mask = tiny_case()
    site = tiny_site().add("thin", image=image[:, :, 13:16], mask=mask[:, :, 13:16]).add("ok")
    report = prepare_site(site.write(), tmp_path / "cache", DataConfig(img_size=32, slices_per_case=4, fov_mm=48.0),
                          progress=False)
    (problem,) = report.problems
    assert problem.case_id == "thin" and "3 axial slices" in problem.problem and report.exit_code == EXIT_DATA_PROBLEMS
