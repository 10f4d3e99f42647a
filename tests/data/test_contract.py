"""The site contract end to end: write a tiny site, check it, prepare it, load it; the site folder stays untouched."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pandas as pd
import pytest

from braintumnet.config import DataConfig
from braintumnet.data.cache import load_prepared, prepared_dir
from braintumnet.data.prepare import check_site, prepare_site
from braintumnet.data.preprocess import brain_mask, representative_slices, scored_slices
from braintumnet.errors import BrainTumNetError

PLAN = [  # case_id, tumour type, split
    ("g1", "glioma", "train"), ("g2", "glioma", "test"), ("m1", "metastasis", "train"),
    ("m2", "metastasis", "train"), ("n1", "meningioma", "train"), ("n2", "meningioma", "test"),
]


def _site(tiny_site):
    site = tiny_site()
    for seed, (case_id, tumor_type, split) in enumerate(PLAN):
        site.add(case_id, tumor_type, split, seed=seed, field_strength_t="3.0", manufacturer="GE")
    return site.write()


def test_round_trip(tiny_site, tiny_case, data_cfg, digest, tmp_path):
    root = _site(tiny_site)
    before = digest(root)
    checked = check_site(root, progress=False)
    assert checked.exit_code == 0 and len(checked.usable) == 6 and not checked.problems

    report = prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    # Training cases: their 4 representative slices; test cases (g2, n2): every slice inside the head.
    head = [len(scored_slices(tiny_case(seed=seed)[0])) for seed, row in enumerate(PLAN) if row[2] == "test"]
    assert 4 < min(head) and report.exit_code == 0 and not report.reused and report.n_slices == 4 * 4 + sum(head)
    assert report.cache_dir == tmp_path / "cache" / "yibin" / "32px_4sl" == prepared_dir(tmp_path / "cache", "yibin",
                                                                                      data_cfg)
    assert "glioma" in report.summary() and str(report.cache_dir) in report.summary()

    site = load_prepared(report.cache_dir)
    assert site.site == "yibin" and site.images.shape == site.masks.shape == (report.n_slices, 32, 32)
    assert site.images.dtype == np.float16 and site.masks.dtype == np.uint8
    assert 0.0 <= site.images.min() and site.images.max() <= 1.0 and set(np.unique(site.masks)) <= {0, 1, 2}
    train = (site.slices["split"] == "train").to_numpy()
    assert (site.masks[train] == 1).any(axis=(1, 2)).sum() >= 8  # the training picks sit on the lesion
    assert list(site.slices.columns[:7]) == ["case_id", "tumor_type", "split", "z_index", "spacing_y_mm",
                                             "spacing_x_mm", "spacing_z_mm"]
    assert (site.slices["spacing_z_mm"] == 2.0).all()  # the scan's own slice spacing
    assert {"field_strength_t", "manufacturer"} <= set(site.slices.columns)
    cases = site.cases()
    assert [tuple(r) for r in cases[["case_id", "tumor_type", "split"]].itertuples(index=False)] == PLAN
    assert (site.cases("train")["n_slices"] == 4).all() and site.cases("test")["n_slices"].tolist() == head
    assert len(site.indices("train", task="binary")) == 3 * 4  # g1, m1, m2
    for case_id in ("g2", "n2"):  # a test case is a contiguous stack in axial order: a volume again
        z = site.slices.loc[site.slices["case_id"] == case_id, "z_index"].to_numpy()
        assert (np.diff(z) == 1).all()
    assert site.meta["counts"]["cases"]["meningioma"] == {"train": 1, "test": 1}
    assert pd.read_csv(report.cache_dir / "quarantine.csv").empty
    assert np.allclose(site.slices["spacing_y_mm"], 48 / 32, rtol=0.05)
    assert digest(root) == before  # nothing was written into the site folder


def test_unchanged_cache_is_reused(tiny_site, data_cfg, tmp_path):
    root = _site(tiny_site)
    first = prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    written = os.stat(first.cache_dir / "images.npy").st_mtime_ns
    again = prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    assert again.reused and "reused" in again.summary() and again.n_slices == first.n_slices
    assert os.stat(first.cache_dir / "images.npy").st_mtime_ns == written

    os.utime(root / "imagesTr" / "g1_0000.nii.gz", ns=(1, 1))  # a source file changed
    assert not prepare_site(root, tmp_path / "cache", data_cfg, progress=False).reused
    other = prepare_site(root, tmp_path / "cache", DataConfig(img_size=48, slices_per_case=3, fov_mm=48.0),
                         progress=False)
    assert not other.reused and other.cache_dir.name == "48px_3sl" and load_prepared(other.cache_dir).images.shape[1:] \
        == (48, 48)


def test_a_cache_of_an_older_preprocessing_is_rebuilt(tiny_site, data_cfg, tmp_path):
    """A cache written before test cases kept the whole scan must not be reused."""
    root = _site(tiny_site)
    first = prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    meta_path = first.cache_dir / "prepared.json"
    meta = json.loads(meta_path.read_text())
    meta["code_version"]["preprocess"] = 3
    meta_path.write_text(json.dumps(meta))
    assert not prepare_site(root, tmp_path / "cache", data_cfg, progress=False).reused


@pytest.mark.parametrize(
    "extent, depth, n, expected",
    [
        ((10, 29), 30, 4, [12, 17, 22, 27]),  # centres of the bins 10-14, 15-19, 20-24, 25-29
        ((10, 13), 30, 4, [10, 11, 12, 13]),  # extent == n: every slice
        ((5, 6), 30, 4, [4, 5, 6, 7]),  # too short: grow symmetrically
        ((5, 5), 30, 4, [4, 5, 6, 7]),  # odd shortfall: the extra slice goes above
        ((0, 1), 30, 4, [0, 1, 2, 3]),  # at the bottom: shift up
        ((29, 29), 30, 4, [26, 27, 28, 29]),  # at the top: shift down
    ],
)
def test_representative_slices(extent, depth, n, expected):
    mask = np.zeros((4, 4, depth), np.uint8)
    mask[1, 1, extent[0]] = 1
    mask[2, 2, extent[1]] = 1
    mask[3, 3, :] = 2  # edema above and below the tumour does not count
    assert representative_slices(mask, n).tolist() == expected


def test_representative_slices_ill_arg():
    with pytest.raises(ValueError, match="fewer than"):
        representative_slices(np.ones((4, 4, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="no tumour"):
        representative_slices(np.zeros((4, 4, 8), np.uint8), 4)


def test_scored_slices_come_from_the_image_alone():
    image = np.zeros((20, 20, 30), np.float32)
    image[4:16, 4:16, 5:21] = 100.0  # the head on z = 5..20
    image[4:16, 4:16, 12] = 0.0  # a dark slice inside it stays: the run is contiguous
    image[9:11, 9:11, 3] = 100.0  # a few bright voxels below: under 5 % of the largest cross-section
    assert scored_slices(image).tolist() == list(range(5, 21))
    assert brain_mask(image)[:, :, 3].sum() == 4
    assert scored_slices(np.zeros((4, 4, 6), np.float32)).tolist() == list(range(6))


def test_test_cases_are_chosen_without_the_labels(tiny_site, tiny_case, data_cfg, tmp_path):
    """The same scan with two different reference masks: as test cases they get the same slices, with each mask's
    own labels on them; as training cases the slices follow each mask's tumour."""
    image, low = tiny_case(seed=1, lesion=(20, 24, 8))
    _, high = tiny_case(seed=1, lesion=(20, 24, 20))
    site = tiny_site()
    for split in ("test", "train"):
        site.add(f"low_{split}", split=split, image=image, mask=low).add(f"high_{split}", split=split, image=image,
                                                                         mask=high)
    prepared = load_prepared(prepare_site(site.write(), tmp_path / "cache", data_cfg, progress=False).cache_dir)
    z = {c: g["z_index"].tolist() for c, g in prepared.slices.groupby("case_id")}
    assert z["low_test"] == z["high_test"] == scored_slices(image).tolist()
    assert z["low_train"] != z["high_train"]
    for case_id, mask in (("low_test", low), ("high_test", high)):
        rows = (prepared.slices["case_id"] == case_id).to_numpy()
        cached = prepared.masks[rows]
        with_tumour = np.asarray(z[case_id])[(cached == 1).any(axis=(1, 2))]
        assert with_tumour.tolist() == np.flatnonzero((mask == 1).any(axis=(0, 1))).tolist()


def test_tumour_outside_the_scored_slices_is_reported(tiny_site, tiny_case, data_cfg, tmp_path, caplog):
    image, mask = tiny_case(seed=2)
    image[:, :, :4] = 0.0  # no head below z = 4 ...
    mask[18:21, 20:23, 1] = 1  # ... yet the reference marks tumour at z = 1
    site = tiny_site().add("t1", split="test", image=image, mask=mask)
    with caplog.at_level(logging.WARNING, logger="braintumnet.data"):
        report = prepare_site(site.write(), tmp_path / "cache", data_cfg, progress=False)
    assert report.exit_code == 0
    assert any("t1" in r.getMessage() and "9 reference tumour voxels" in r.getMessage() for r in caplog.records)


def _break(root, what):
    if what == "no folder":
        return root / "nowhere", "no such site folder"
    if what == "no dataset.json":
        (root / "dataset.json").unlink()
    elif what == "bad json":
        (root / "dataset.json").write_text("{site: yibin")
    elif what == "modality":
        meta = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**meta, "modality": "T2"}))
    elif what == "no cases.csv":
        (root / "cases.csv").unlink()
    elif what == "column":
        pd.read_csv(root / "cases.csv").drop(columns="split").to_csv(root / "cases.csv", index=False)
    elif what == "split":
        pd.read_csv(root / "cases.csv").assign(split="val").to_csv(root / "cases.csv", index=False)
    return root, {"no dataset.json": "dataset.json: missing", "bad json": "dataset.json: not valid JSON",
                  "modality": "modality 'T2' is not supported", "no cases.csv": "cases.csv: missing",
                  "column": "missing column(s) split", "split": "split must be train or test"}[what]


@pytest.mark.parametrize("what", ["no folder", "no dataset.json", "bad json", "modality", "no cases.csv", "column",
                                  "split"])
def test_site_level_problems_name_the_file(tiny_site, data_cfg, tmp_path, what):
    root, phrase = _break(tiny_site().add("g1").write(), what)
    with pytest.raises(BrainTumNetError, match=re.escape(phrase)) as caught:
        check_site(root, progress=False)
    assert caught.value.exit_code == 2
    with pytest.raises(BrainTumNetError, match=re.escape(phrase)):
        prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    assert not (tmp_path / "cache").exists()


def test_cache_inside_site_folder_is_refused(tiny_site, data_cfg):
    root = tiny_site().add("g1").write()
    with pytest.raises(BrainTumNetError, match="inside the site folder"):
        prepare_site(root, root / "cache", data_cfg, progress=False)
    assert not (root / "cache").exists()


def test_load_prepared_without_cache(tmp_path):
    with pytest.raises(BrainTumNetError, match="braintumnet prepare"):
        load_prepared(tmp_path)
