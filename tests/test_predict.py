"""``braintumnet predict``: masks in the input's own geometry, the JSON summary and report, and bad input.

A tiny synthetic head (an ellipsoid brain with one bright tumour and a darker edema shell) stands in for a scan, so
the tests control its orientation exactly; a model trained for a few steps on it must find the tumour again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from braintumnet.checkpoint import load_model, save_checkpoint
from braintumnet.config import resolve
from braintumnet.data.checks import Case
from braintumnet.data.contract import LABELS, TASKS
from braintumnet.data.dicom_io import write_dicom_series
from braintumnet.data.loading import prepare_and_load
from braintumnet.data.preprocess import preprocess_case
from braintumnet.data.readers import Volume, read_volume
from braintumnet.engine import build_model, train_model
from braintumnet.errors import BrainTumNetError
from braintumnet.evaluate import evaluate_checkpoint
from braintumnet.inference import SliceGrid
from braintumnet.metrics import segmentation_case_metrics
from braintumnet.predict import CaseInput, SomeCasesFailed, predict, predict_case

CPU = torch.device("cpu")
SUMMARY_KEYS = {"case", "input", "mask", "tumor_type", "probabilities", "volume_tumor_ml", "volume_edema_ml",
                "n_slices", "model", "synthetic_training", "note"}
SHAPE, SPACING = (40, 40, 10), (2.4, 2.4, 3.0)  # 96 × 96 × 30 mm
STORED_AXES = ("L", "S", "A")  # how the NIfTI input stores its axes: neither RAS nor axial-last


def tiny_head(centre=(22, 18, 5), seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical (RAS) image, mask (1 tumour, 2 edema) and affine of a small synthetic head."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    brain = ((x - 20) / 16) ** 2 + ((y - 20) / 17) ** 2 + ((z - 5) / 7) ** 2 <= 1
    r = np.sqrt(((x - centre[0]) * SPACING[0]) ** 2 + ((y - centre[1]) * SPACING[1]) ** 2
                + ((z - centre[2]) * SPACING[2]) ** 2)
    mask = np.where(r <= 12.0, 1, np.where(r <= 18.0, 2, 0)).astype(np.uint8) * brain
    image = np.where(brain, 400.0, 20.0) + np.where(mask == 1, 500.0, 0) - np.where(mask == 2, 150.0, 0)
    image = (image + rng.normal(0, 15, SHAPE)).clip(0).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-48.0, -60.0, -10.0)
    return image, mask, affine


def stored(array: np.ndarray, affine: np.ndarray, axes=STORED_AXES) -> tuple[np.ndarray, np.ndarray]:
    """A canonical array and affine re-laid out with ``axes`` (as a scanner or converter might store them)."""
    turn = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(axes))
    return apply_orientation(array, turn), affine @ inv_ornt_aff(turn, array.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def overlaps(labels: np.ndarray, reference: np.ndarray) -> bool:
    """The predicted tumour overlaps the reference tumour, and the predicted lesion lies mostly in the reference's."""
    inside = ((labels > 0) & (reference > 0)).sum() / max((labels > 0).sum(), 1)
    return dice(labels == 1, reference == 1) > 0.5 and inside > 0.6


@pytest.fixture(scope="module")
def scan_profile():
    """32 px over a 96 mm field of view (3 mm pixels), every slice of the 10-slice volume prepared."""
    profile = resolve({"profile": "quick", "data.img-size": 32, "data.slices-per-case": 10, "model.feature-size": 8,
                       "train.batch-size": 10, "train.learning-rate": 1e-2})
    return dataclasses.replace(profile, data=dataclasses.replace(profile.data, fov_mm=96.0),
                               train=dataclasses.replace(profile.train, flip_prob=0.0, rotation_deg=0.0))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The case three ways: a site folder (NIfTI stored as L-S-A), the NIfTI file, and a DICOM series."""
    root = tmp_path_factory.mktemp("predict")
    image, mask, affine = tiny_head()
    site = root / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    nib.save(nib.Nifti1Image(*stored(image, affine)), site / "images" / "c001.nii.gz")
    nib.save(nib.Nifti1Image(*stored(mask, affine)), site / "masks" / "c001.nii.gz")
    (site / "dataset.json").write_text(json.dumps({"site": "tiny", "modality": "CE-T1", "synthetic": True,
                                                   "labels": {str(k): v for k, v in LABELS.items()},
                                                   "tumor_types": list(TASKS["3class"])}))
    (site / "cases.csv").write_text("case_id,image,mask,tumor_type,split\n"
                                    "c001,images/c001.nii.gz,masks/c001.nii.gz,glioma,train\n")
    write_dicom_series(image, affine, root / "dicom" / "c001", patient_id="c001", rescale_slope=0.5)
    return {"root": root, "site": site, "nifti": site / "images" / "c001.nii.gz", "gt": site / "masks" / "c001.nii.gz",
            "dicom": root / "dicom" / "c001", "mask": mask}


@pytest.fixture(scope="module")
def trained(scan, scan_profile, tmp_path_factory):
    """A checkpoint trained for 40 steps (one batch of the case's 10 slices each) with engine.train_model.

    Over initial seeds 0-7 this gave tumour Dice 0.72-0.93 on the scan's own grid, with 74-100 % of the predicted
    lesion inside the reference lesion (some seeds had not yet learnt the edema), so the thresholds of ``overlaps``
    leave a margin without accepting a model that missed.
    """
    site = prepare_and_load(scan["site"], tmp_path_factory.mktemp("cache"), scan_profile.data, progress=False)
    torch.manual_seed(0)
    model = build_model(scan_profile)
    train_model(model, [site], scan_profile, CPU, epochs=40, progress=False)
    return save_checkpoint(scan["root"] / "model.pt", model.state_dict(), scan_profile, TASKS["3class"],
                           {"synthetic": True})


@pytest.mark.parametrize("spacing, centre", [((3.0, 3.0), (16, 16)), ((2.4, 2.4), (26, 12)), ((1.7, 3.9), (14, 21))])
def test_slice_grid_inverts_preprocessing(scan_profile, spacing, centre):
    """Labels prepared by preprocess_case and mapped back by SliceGrid land where they came from."""
    image, mask, affine = tiny_head(centre=(*centre, 5))
    affine = np.diag([*spacing, 3.0, 1.0])
    depth = image.shape[2]
    volume = Volume(image, affine)
    slices = preprocess_case(Case("c", "", volume, mask), dataclasses.replace(scan_profile.data, slices_per_case=depth))
    back = SliceGrid.of(image, spacing, scan_profile.data).to_volume(slices.masks)
    assert back.shape == mask.shape
    for label in (1, 2):
        expected = 1.0 if spacing == (3.0, 3.0) else 0.85  # 3 mm is the model grid itself: exact
        assert dice(back == label, mask == label) >= expected


def test_predict_nifti_keeps_the_input_geometry_and_finds_the_tumour(trained, scan, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="braintumnet.predict"):
        results = predict(trained, scan["nifti"], tmp_path, progress=False)
    # The checkpoint says it was trained on synthetic data: the terminal says so before anything else.
    assert any("trained on SYNTHETIC data" in r.getMessage() for r in caplog.records)
    assert len(results) == 1
    summary = results[0]
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((tmp_path / "c001.json").read_text()) == summary
    assert (tmp_path / "c001_report.png").stat().st_size > 10_000
    assert (tmp_path / "predictions.csv").is_file()
    source, mask = nib.load(scan["nifti"]), nib.load(summary["mask"])
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    labels, reference = np.asarray(mask.dataobj), np.asarray(nib.load(scan["gt"]).dataobj)
    assert overlaps(labels, reference)
    assert summary["tumor_type"] in TASKS["3class"]
    assert sum(summary["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    voxel_ml = np.prod(SPACING) / 1000
    assert summary["volume_tumor_ml"] == pytest.approx((labels == 1).sum() * voxel_ml, rel=1e-3)
    assert summary["synthetic_training"] is True and "not for clinical use" in summary["note"]


def test_predict_and_evaluate_give_the_same_numbers(trained, tmp_path):
    """One test case, one checkpoint: ``braintumnet evaluate``'s per-case Dice, HD95 and tumour type equal what the
    mask and summary ``braintumnet predict`` writes give on the scan's own grid (3-D, its own slice spacing).

    The scan's in-plane spacing is the model grid's (96 mm / 32 px = 3 mm), so preparing it only crops: predict's
    mask on the scan grid holds exactly the labels evaluate scores on the prepared grid. At another spacing predict
    maps the labels back to the scan grid by nearest neighbour, which moves surfaces by up to a pixel, and the two
    agree only to that precision.
    """
    image, mask, _ = tiny_head(centre=(21, 19, 5), seed=3)
    affine = np.diag([3.0, 3.0, 4.0, 1.0])  # 4 mm slices: HD95 is measured through-plane too
    site = tmp_path / "site"
    for sub, array in (("images", image), ("masks", mask)):
        (site / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, affine), site / sub / "c002.nii.gz")
    (site / "dataset.json").write_text(json.dumps({"site": "tiny", "modality": "CE-T1", "synthetic": True,
                                                   "labels": {str(k): v for k, v in LABELS.items()},
                                                   "tumor_types": list(TASKS["3class"])}))
    (site / "cases.csv").write_text("case_id,image,mask,tumor_type,split\n"
                                    "c002,images/c002.nii.gz,masks/c002.nii.gz,glioma,test\n")

    evaluated = evaluate_checkpoint(trained, [site], tmp_path / "eval", cache_root=tmp_path / "cache", split="test",
                                    progress=False)
    row = pd.read_csv(tmp_path / "eval" / "per_case.csv").iloc[0]
    summary = predict(trained, site / "images" / "c002.nii.gz", tmp_path / "pred", progress=False)[0]
    labels = np.asarray(nib.load(summary["mask"]).dataobj)
    ours = segmentation_case_metrics(np.moveaxis(labels, 2, 0), np.moveaxis(mask, 2, 0), (3.0, 3.0), 4.0)

    assert 0.3 < ours["dice_tumor"] < 1.0  # a real prediction, neither empty nor trivially perfect
    for key in ("dice_tumor", "iou_tumor", "hd95_tumor_mm", "hd_tumor_mm", "dice_edema", "hd95_whole_mm"):
        assert row[key] == pytest.approx(ours[key], rel=1e-6, abs=1e-9), key
    assert evaluated["metrics"]["dice_tumor"] == pytest.approx(ours["dice_tumor"], rel=1e-6)
    for name, p in summary["probabilities"].items():
        assert row[f"prob_{name}"] == pytest.approx(p, abs=1e-4), name


def test_predict_dicom_series_with_tta(trained, scan, tmp_path):
    summary = predict(trained, scan["dicom"], tmp_path, tta=True, progress=False)[0]
    series = read_volume(scan["dicom"])
    mask = nib.load(summary["mask"])
    assert mask.shape == series.array.shape
    np.testing.assert_allclose(mask.affine, series.affine, atol=1e-4)
    assert nib.load(summary["image"]).shape == series.array.shape
    labels = np.asarray(mask.dataobj)  # the series was written in RAS order: compare with the canonical mask
    assert overlaps(labels, scan["mask"])


def test_predict_a_folder_of_cases(trained, scan, tmp_path):
    """A site folder: its cases.csv says which files are images (the masks are not predicted)."""
    results = predict(trained, scan["site"], tmp_path, progress=False)
    assert [r["case"] for r in results] == ["c001"]
    assert (tmp_path / "c001_mask.nii.gz").is_file()


def test_batch_mode_goes_on_past_a_bad_case(trained, scan, tmp_path):
    """In a folder of scans, a broken one is reported (exit code 3) and the others are still predicted."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes(scan["nifti"].read_bytes())
    _write(folder / "broken.nii.gz", b"not a nifti at all")
    with pytest.raises(SomeCasesFailed, match="1 of 2 case") as info:
        predict(trained, folder, tmp_path / "out", progress=False)
    assert info.value.exit_code == 3 and [r["case"] for r in info.value.results] == ["good"]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("case")
    assert "broken.nii.gz" in table.loc["broken", "error"] and (tmp_path / "out" / "good_mask.nii.gz").is_file()


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.nii.gz", "no such file or folder"),
    (lambda d: _write(d / "scan.nii.gz", b"not a nifti at all"), "cannot be read as NIfTI"),
    (lambda d: _save(d / "4d.nii.gz", np.zeros((8, 8, 4, 3), np.float32)), "4-D"),
    (lambda d: _write(d / "IM0001.dcm", b"DICM"), "not a NIfTI file"),
])
def test_bad_input_names_the_file_and_the_fix(trained, tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(BrainTumNetError, match=expected) as info:
        predict(trained, path, tmp_path / "out", progress=False)
    assert path.name in str(info.value)


def test_a_scan_with_a_nan_voxel_is_refused(trained, tmp_path):
    """One NaN voxel made every probability NaN, and a report said "glioma, p = nan, 0 mL"."""
    image, _, affine = tiny_head()
    image[20, 20, 5] = np.nan
    path = _save(tmp_path / "nanvoxel.nii.gz", image, affine)
    with pytest.raises(BrainTumNetError, match="1 voxels are NaN or Inf") as info:
        predict(trained, path, tmp_path / "out", progress=False)
    assert str(path) in str(info.value) and "re-export" in str(info.value)
    assert not list((tmp_path / "out").glob("nanvoxel*"))


def test_case_ids_cannot_lead_outside_the_output_folder(trained, scan, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(scan["site"], site)
    (site / "cases.csv").write_text("case_id,image,mask,tumor_type,split\n"
                                    "../../x/config,images/c001.nii.gz,masks/c001.nii.gz,glioma,train\n")
    out = tmp_path / "a" / "out"
    with pytest.raises(BrainTumNetError, match=r"cases.csv: line 2: case id '../../x/config' must be a plain name"):
        predict(trained, site, out, progress=False)
    assert not (tmp_path / "x").exists()
    # The output path refuses such a name whatever its source.
    model, ckpt = load_model(trained)
    with pytest.raises(BrainTumNetError, match="outside"):
        predict_case(model, ckpt.profile, CaseInput("../../x/config", scan["nifti"]), out, {}, tta=False,
                     device=CPU)
    assert not (tmp_path / "x").exists()


def test_bad_checkpoints(trained, scan, tmp_path, scan_profile):
    corrupt = _write(tmp_path / "corrupt.pt", trained.read_bytes()[:5000])
    with pytest.raises(BrainTumNetError, match="corrupt"):
        predict(corrupt, scan["nifti"], tmp_path / "out", progress=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(BrainTumNetError, match="not a BrainTumNet checkpoint"):
        predict(foreign, scan["nifti"], tmp_path / "out", progress=False)
    with pytest.raises(BrainTumNetError, match=r"trained for the 3class task .* not binary"):
        predict(trained, scan["nifti"], tmp_path / "out", task="binary", progress=False)
    # Weights of the 3-class model saved under the binary task's class names: a file assembled from two models.
    mixed = save_checkpoint(tmp_path / "mixed.pt", build_model(scan_profile).state_dict(), scan_profile,
                            TASKS["binary"])
    mixed_message = r"weights are for the 3class task .* the binary task \(glioma, metastasis\)"
    with pytest.raises(BrainTumNetError, match=mixed_message):
        predict(mixed, scan["nifti"], tmp_path / "out", progress=False)


@pytest.fixture(scope="module")
def phantom_model(tiny_profile, tmp_path_factory):
    """An untrained model at the shared tiny profile (240 mm field of view): enough to check files and geometry."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("phantom-model") / "model.pt",
                           build_model(tiny_profile).state_dict(), tiny_profile, TASKS["3class"])


def test_predict_a_phantom_case_as_nifti_and_as_dicom(phantom_model, phantom_root, tmp_path):
    """The same phantom scan as its NIfTI file and as a DICOM series: both masks sit on the scan's grid."""
    nifti = sorted((phantom_root / "yibin" / "imagesTr").glob("*_0000.nii.gz"))[0]
    source = nib.load(nifti)
    write_dicom_series(source.get_fdata(dtype=np.float32), source.affine, tmp_path / "dicom" / "yibin_x",
                       patient_id="yibin_x")
    from_nifti = predict(phantom_model, nifti, tmp_path / "a", progress=False)[0]
    from_dicom = predict(phantom_model, tmp_path / "dicom" / "yibin_x", tmp_path / "b", progress=False)[0]
    assert from_nifti["case"] == nifti.name[: -len("_0000.nii.gz")] and from_dicom["case"] == "yibin_x"
    for summary in (from_nifti, from_dicom):
        assert SUMMARY_KEYS <= set(summary)
        assert summary["synthetic_training"] is None  # the checkpoint does not say
        assert summary["n_slices"] == source.shape[2]
        mask = nib.load(summary["mask"])
        assert mask.shape == source.shape  # the phantom writes RAS, so the series' canonical grid is the file's
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
        assert Path(summary["report"]).is_file()


def test_cli_prints_one_line_not_a_traceback(trained, tmp_path, capsys):
    from braintumnet import cli

    code = cli.main(["predict", "--model", str(trained), "--input", str(tmp_path / "nope.nii.gz"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.nii.gz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path
