"""The phantom cohort (braintumnet.data.phantom): the paper's counts, the site contract, determinism, DICOM, preview.

Counts come from the plan alone (no images). Anything that writes images uses scale 0.001-0.03 (12-18 cases); the
NIfTI cohort is the session's shared ``phantom_root`` (scale 0.03, seed 0).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from braintumnet.data.contract import CASES_COLUMNS, EXTERNAL_SITE, SCANNER_COLUMNS, SITES, TUMOR_TYPES
from braintumnet.data.phantom import cohort_plan, complete_cohort, generate_cohort
from braintumnet.data.phantom.cohort import MARKER, _claim
from braintumnet.data.phantom.plan import ATYPICAL, SITE_MIX, cell_counts
from braintumnet.data.phantom.render import render_case
from braintumnet.data.phantom.writer import write_case
from braintumnet.data.readers import geometry_mismatch, read_volume
from braintumnet.errors import BrainTumNetError

ALL_SITES = (*SITES, EXTERNAL_SITE)


# --- The plan: the paper's cohort (§2.1.1), computed without writing images ---


def test_paper_counts_at_scale_1():
    plan = cohort_plan(1.0, seed=0)
    internal = plan[plan["site"] != EXTERNAL_SITE]
    assert len(internal) == 485
    assert internal["tumor_type"].value_counts().to_dict() == {"glioma": 167, "metastasis": 156, "meningioma": 162}
    # The paper's 378 + 109 is two more than its 485 cases: the phantom keeps the 109 test cases.
    assert internal["split"].value_counts().to_dict() == {"train": 376, "test": 109}
    external = plan[plan["site"] == EXTERNAL_SITE]
    assert external["tumor_type"].value_counts().to_dict() == {t: 17 for t in TUMOR_TYPES}
    assert set(external["split"]) == {"test"}
    assert len(plan) == 536 and plan["case_id"].is_unique
    for site, mix in SITE_MIX.items():
        assert internal[internal["site"] == site]["tumor_type"].value_counts().to_dict() == mix


def test_sites_are_non_iid_and_external_scanner_is_unseen():
    plan = cohort_plan(1.0, seed=0)
    majority = {s: plan[plan["site"] == s]["tumor_type"].value_counts().idxmax() for s in SITES}
    assert sorted(majority.values()) == sorted(TUMOR_TYPES)  # each hospital leans to a different type
    profiles = plan.groupby("site")["scanner"].agg(set)
    assert all(len(p) == 1 for p in profiles)
    assert not profiles[EXTERNAL_SITE] & set.union(*(profiles[s] for s in SITES))
    columns = plan.groupby("site")[["manufacturer", "slice_thickness_mm"]].first()
    assert columns.loc[EXTERNAL_SITE, "manufacturer"] not in set(columns.loc[list(SITES), "manufacturer"])


def test_each_site_type_split_cell_and_test_share():
    plan = cohort_plan(1.0, seed=0)
    for site in SITES:
        mine = plan[plan["site"] == site]
        share = (mine["split"] == "test").mean()
        assert 0.2 < share < 0.25  # every site keeps about 109/485 of its cases for testing
        assert all(splits == {"train", "test"} for splits in mine.groupby("tumor_type")["split"].agg(set))


def test_atypical_share_and_tags():
    plan = cohort_plan(1.0, seed=0)
    for tumor_type, tag in ATYPICAL.items():
        rows = plan[plan["tumor_type"] == tumor_type]
        assert set(rows["atypical"]) == {"", tag}
        assert 0.10 <= (rows["atypical"] != "").mean() <= 0.15
    mets = plan[plan["tumor_type"] == "metastasis"]
    assert set(mets["n_lesions"]) == {1, 2, 3, 4}
    assert (mets[mets["atypical"] != ""]["n_lesions"] == 1).all()  # "solitary" large necrotic metastasis


@pytest.mark.parametrize("scale", [0.5, 0.2, 0.1, 0.05, 0.03, 0.02])
def test_counts_shrink_in_proportion(scale):
    full = cell_counts(1.0).set_index(["site", "tumor_type"])
    small = cell_counts(scale).set_index(["site", "tumor_type"])
    for cell, row in full.iterrows():
        n, expected = small.loc[cell, ["train", "test"]].sum(), (row["train"] + row["test"]) * scale
        assert abs(n - expected) < 1 or n == 1, (cell, n, expected)
    plan = cohort_plan(scale, seed=0)
    for site in ALL_SITES:
        mine = plan[plan["site"] == site]
        assert set(mine["tumor_type"]) == set(TUMOR_TYPES)
        assert (mine["split"] == "test").sum() >= 1
    internal = plan[plan["site"] != EXTERNAL_SITE]
    assert abs((internal["split"] == "test").sum() - 109 * scale) <= len(SITES)


def test_plan_is_deterministic_and_seeded():
    a, b, c = cohort_plan(0.2, seed=3), cohort_plan(0.2, seed=3), cohort_plan(0.2, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["tumor_type", "split"]].equals(c[["tumor_type", "split"]])


def test_a_larger_test_scale_adds_test_only_cases_and_changes_nothing_else():
    """quick holds out standard's test sets: its training cases must be the very cases of its own scale."""
    own, held = cohort_plan(0.1, seed=0), cohort_plan(0.1, seed=0, test_scale=0.3)
    standard = cohort_plan(0.3, seed=0)
    kept = held[held["case_id"].isin(own["case_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, own)  # every case of the plain plan, row for row, in the same order
    added = held[~held["case_id"].isin(own["case_id"])]
    assert set(added["split"]) == {"test"} and held["case_id"].is_unique
    for site in ALL_SITES:
        tests = held[(held["site"] == site) & (held["split"] == "test")]
        assert len(tests) == (standard[(standard["site"] == site)]["split"] == "test").sum()
        mine = held[held["site"] == site]["case_id"]
        # Added after the site's own cases, numbered on from them.
        assert list(mine) == [f"{site}_{i:04d}" for i in range(1, len(mine) + 1)]
        assert list(mine.isin(own["case_id"])) == sorted(mine.isin(own["case_id"]), reverse=True)
    internal = held[(held["site"] != EXTERNAL_SITE) & (held["split"] == "test")]
    assert len(internal) == 33 and (held["site"] == EXTERNAL_SITE).sum() == 15
    assert set(internal["tumor_type"]) == set(TUMOR_TYPES)
    # The added cases carry atypical ones too (a cell adds a handful, too few for its 12 % to round above none).
    many = cohort_plan(0.05, seed=0, test_scale=1.0)
    extra = many[~many["case_id"].isin(cohort_plan(0.05, seed=0)["case_id"])]
    assert len(extra) > 100 and 0.08 <= (extra["atypical"] != "").mean() <= 0.16
    assert set(extra["atypical"]) == {"", *ATYPICAL.values()}
    assert (added["atypical"] != "").sum() >= 1
    # Not above the scale, or none: the plain plan.
    pd.testing.assert_frame_equal(cohort_plan(0.3, seed=0, test_scale=0.3), standard)
    pd.testing.assert_frame_equal(cohort_plan(0.3, seed=0, test_scale=0.1), standard)
    with pytest.raises(ValueError, match="test_scale=2"):
        cohort_plan(0.1, test_scale=2)


def test_a_bad_test_scale_leaves_the_previous_cohort_alone(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"generator": "braintumnet.data.phantom", "complete": True}))
    (tmp_path / "yibin").mkdir()
    with pytest.raises(ValueError, match="test_scale=3"):
        generate_cohort(tmp_path, scale=0.02, test_scale=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "yibin"]


def test_the_study_holds_out_larger_test_sets_only_at_the_profile_scale():
    from simulation.cohort import cohort_scales

    assert cohort_scales("quick", None) == (0.1, 0.3)
    assert cohort_scales("standard", None) == (0.3, None)
    assert cohort_scales("quick", 0.05) == (0.05, None)  # --scale is the whole cohort's


def test_added_test_cases_are_written_and_marked(tmp_path):
    out = tmp_path / "held"
    summary = generate_cohort(out, scale=0.02, seed=0, test_scale=0.04, progress=False, workers=1)
    assert json.loads((out / MARKER).read_text())["test_scale"] == 0.04
    assert generate_cohort(tmp_path / "plain", scale=0.02, test_scale=0.01, progress=False).test_scale is None
    assert "held out at scale 0.04" in summary.summary()
    plain = cohort_plan(0.02, seed=0)
    for site in ALL_SITES:
        cases = pd.read_csv(out / site / "cases.csv", dtype=str)
        planned = summary.plan[summary.plan["site"] == site]
        assert list(cases["case_id"]) == list(planned["case_id"])
        assert len(cases) >= (plain["site"] == site).sum()
    assert len(summary.plan) > len(plain)


@pytest.mark.parametrize("scale", [0, -0.5, 1.5, float("nan"), "half"])
def test_ill_scale(scale, tmp_path):
    with pytest.raises(ValueError, match="scale"):
        cohort_plan(scale)
    with pytest.raises(ValueError, match="scale"):
        generate_cohort(tmp_path / "out", scale=scale)
    assert not (tmp_path / "out").exists()


def test_ill_format_seed_and_workers(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        generate_cohort(tmp_path / "out", fmt="png")
    with pytest.raises(ValueError, match="seed"):
        generate_cohort(tmp_path / "out", seed=-1)
    with pytest.raises(ValueError, match="workers"):
        generate_cohort(tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists()


# --- The output folder ---


def test_refuses_a_folder_that_is_not_a_phantom(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BrainTumNetError, match=str(tmp_path)) as err:
        generate_cohort(tmp_path, scale=0.02)
    assert "new or empty folder" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(BrainTumNetError, match="is a file"):
        generate_cohort(tmp_path / "notes.txt", scale=0.02)


def test_only_a_finished_cohort_of_ours_counts_as_there(tmp_path):
    assert complete_cohort(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"generator": "braintumnet.data.phantom", "complete": False}))
    assert complete_cohort(tmp_path) is None  # generation was interrupted
    (tmp_path / MARKER).write_text(json.dumps({"generator": "someone else", "complete": True}))
    assert complete_cohort(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"generator": "braintumnet.data.phantom", "complete": True, "seed": 3}))
    assert complete_cohort(tmp_path)["seed"] == 3


def test_a_previous_phantom_is_replaced_and_nothing_else_touched(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"generator": "braintumnet.data.phantom", "complete": False}))
    (tmp_path / "yibin" / "imagesTr").mkdir(parents=True)
    (tmp_path / "yibin" / "imagesTr" / "old.nii.gz").write_bytes(b"x")
    (tmp_path / "README.txt").write_text("the user's own")
    _claim(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt"]


# --- A written cohort (NIfTI, the session's shared phantom) ---


def test_site_folders_follow_the_contract(phantom_root):
    plan = pd.read_csv(phantom_root / "plan.csv", dtype={"atypical": str}, keep_default_na=False)
    assert json.loads((phantom_root / MARKER).read_text())["complete"] is True
    assert complete_cohort(phantom_root)["cases"] == len(plan)
    for site in ALL_SITES:
        meta = json.loads((phantom_root / site / "dataset.json").read_text())
        assert meta["site"] == site and meta["modality"] == "CE-T1" and meta["synthetic"] is True
        assert "NOT patient data" in meta["description"]
        assert meta["labels"] == {"0": "background", "1": "tumour (enhancing + necrotic core)",
                                  "2": "peritumoral edema"}
        cases = pd.read_csv(phantom_root / site / "cases.csv", dtype=str)
        assert list(cases.columns) == [*CASES_COLUMNS, *SCANNER_COLUMNS]
        assert list(cases["case_id"]) == list(plan[plan["site"] == site]["case_id"])
        for image, mask in zip(cases["image"], cases["mask"]):
            assert (phantom_root / site / image).is_file() and (phantom_root / site / mask).is_file()


@pytest.mark.parametrize("site", ALL_SITES)
def test_mask_matches_image(phantom_root, site):
    cases = pd.read_csv(phantom_root / site / "cases.csv", dtype=str)
    row = cases.iloc[0]
    image_nii, mask_nii = nib.load(phantom_root / site / row["image"]), nib.load(phantom_root / site / row["mask"])
    mask = np.asarray(mask_nii.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).any()
    assert image_nii.shape == mask_nii.shape and np.array_equal(image_nii.affine, mask_nii.affine)
    image = image_nii.get_fdata()
    assert np.isfinite(image).all() and image.max() > 0
    # The slice thickness in cases.csv is the image's.
    assert np.isclose(np.linalg.norm(image_nii.affine[:3, 2]), float(row["slice_thickness_mm"]))
    # Enhancement: the tumour is brighter than the brain around it on CE-T1 (a meningioma's most of all).
    assert np.percentile(image[mask == 1], 90) > np.percentile(image[mask == 0], 90)


def test_same_seed_same_bytes(phantom_root, tmp_path):
    again = tmp_path / "again"
    generate_cohort(again, scale=0.03, seed=0, progress=False)
    files = sorted(p.relative_to(phantom_root) for p in phantom_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (phantom_root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_in_process_case_and_other_seed(phantom_root, tmp_path):
    """One worker or many, a case's bytes are the same; another seed draws another case."""
    row = cohort_plan(0.03, seed=0).iloc[0]
    write_case(tmp_path / "s0", row["case_id"], render_case(row, seed=0), "nifti", seed=0)
    write_case(tmp_path / "s1", row["case_id"], render_case(row, seed=1), "nifti", seed=1)
    name = f"imagesTr/{row['case_id']}_0000.nii.gz"
    written = (phantom_root / row["site"] / name).read_bytes()
    assert (tmp_path / "s0" / name).read_bytes() == written
    assert (tmp_path / "s1" / name).read_bytes() != written


# --- DICOM and the preview ---


@pytest.fixture(scope="module")
def dicom_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom-dicom") / "cohort"
    return out, generate_cohort(out, scale=0.001, seed=0, fmt="dicom", preview=True, progress=False)


def test_dicom_series_are_readable_with_geometry(dicom_cohort):
    out, summary = dicom_cohort
    assert len(summary.plan) == 12  # the minimum: one case per site x type
    for site in ALL_SITES:
        cases = pd.read_csv(out / site / "cases.csv", dtype=str)
        row = cases.iloc[0]
        assert row["image"] == f"dicom/{row['case_id']}"
        series = out / site / row["image"]
        image, mask = read_volume(series), read_volume(out / site / row["mask"])
        assert geometry_mismatch(image, mask) is None
        first = pydicom.dcmread(sorted(series.iterdir())[0])
        assert first.Manufacturer == row["manufacturer"]
        assert float(first.MagneticFieldStrength) == float(row["field_strength_t"])
        assert np.isclose(float(first.SliceThickness), float(row["slice_thickness_mm"]))
        assert len(list(series.iterdir())) == image.array.shape[2]
    # The same case drawn for NIfTI gives the same voxels (the external site also checks a rescale slope of 2.5).
    plan = summary.plan.set_index("case_id", drop=False)
    case_id = pd.read_csv(out / EXTERNAL_SITE / "cases.csv", dtype=str)["case_id"].iloc[0]
    drawn = render_case(plan.loc[case_id], seed=0)
    read = read_volume(out / EXTERNAL_SITE / "dicom" / case_id)
    assert np.array_equal(read.array, drawn.image) and np.allclose(read.affine, drawn.affine, atol=1e-4)


def test_preview_and_summary(dicom_cohort):
    out, summary = dicom_cohort
    png = out / "preview.png"
    assert summary.preview == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    text = summary.summary()
    assert "SYNTHETIC" in text and "12 cases" in text and "GB on disk" in text
    assert summary.counts().loc["external", "test"] == 3
