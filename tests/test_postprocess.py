"""Post-processing of a case's predicted labels (braintumnet/postprocess.py), and that every evaluation scores a case
after it."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from braintumnet.checkpoint import load_model, save_checkpoint
from braintumnet.cli import main
from braintumnet.data.contract import class_names
from braintumnet.data.dataset import SliceDataset, select_slices
from braintumnet.engine import build_model
from braintumnet.metrics import segmentation_case_metrics
from braintumnet.postprocess import POSTPROCESS_RULES, postprocess_case
from braintumnet.scoring import evaluate_cases, predict_slices


def lesions() -> np.ndarray:
    """Six slices: a tumour with its edema around it on slices 0-2 (one lesion), a small tumour far from it on slice
    4, and an edema speck on slice 5 that touches the first lesion's column only through slice 3, which is empty."""
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[0:3, 2:9, 2:9] = 2
    labels[0:3, 4:7, 4:7] = 1
    labels[4, 12:14, 12:14] = 1
    labels[5, 4:6, 4:6] = 2
    return labels


def test_the_largest_lesion_keeps_its_tumour_and_edema_together_and_nothing_else():
    labels = lesions()
    before = labels.copy()
    kept = postprocess_case(labels, None, "largest-lesion")
    np.testing.assert_array_equal(labels, before)  # the input is not changed
    np.testing.assert_array_equal(kept[0:3], labels[0:3])  # tumour and edema: one lesion
    assert not kept[3:].any()


def test_slices_stack_in_axial_order_gap_or_not_and_come_back_in_their_own_order():
    """A training case scored in cross-validation holds slices spread through its tumour (z 10, 13, 16): stacked
    they are one lesion, bigger than a false one on the slice beside them."""
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, 1:4, 1:4] = 1  # z = 10
    labels[1, 1:4, 1:4] = 1  # z = 13
    labels[2, 2:5, 2:5] = 2  # z = 16: overlaps the one above in-plane
    labels[3, 6:8, 6:8] = 1  # z = 17: away from it in-plane, a false lesion of 4 voxels
    kept = postprocess_case(labels, [10, 13, 16, 17], "largest-lesion")
    np.testing.assert_array_equal(kept[:3], labels[:3])
    assert not kept[3].any()
    # The same slices handed over in another order come back in that order.
    shuffled = postprocess_case(labels[[3, 0, 2, 1]], [17, 10, 16, 13], "largest-lesion")
    np.testing.assert_array_equal(shuffled, kept[[3, 0, 2, 1]])


def test_lesions_touching_only_at_an_edge_or_a_corner_stay_two():
    labels = np.zeros((2, 6, 6), np.uint8)
    labels[0, 0:3, 0:3] = 1  # 9 voxels
    labels[1, 3:5, 3:5] = 2  # 4 voxels, touching the first only at a corner (z+1, row+1, column+1)
    labels[0, 3, 5] = 1  # 1 voxel, touching the second only along an edge (z-1, row 3)
    kept = postprocess_case(labels, None, "largest-lesion")
    np.testing.assert_array_equal(kept[0, 0:3, 0:3], labels[0, 0:3, 0:3])
    assert kept.sum() == 9


def test_none_keeps_every_voxel_and_an_empty_prediction_stays_empty():
    labels = lesions()
    same = postprocess_case(labels, None, "none")
    np.testing.assert_array_equal(same, labels)
    assert same is not labels and not np.shares_memory(same, labels)
    empty = np.zeros((4, 8, 8), np.uint8)
    assert not postprocess_case(empty, None, "largest-lesion").any()


def test_bad_rule_or_slice_indices_are_refused():
    with pytest.raises(ValueError, match="biggest"):
        postprocess_case(lesions(), None, "biggest")
    with pytest.raises(ValueError, match="one distinct axial index"):
        postprocess_case(lesions(), [0, 1, 1, 2, 3, 4], "largest-lesion")


@pytest.fixture(scope="module")
def untrained(tiny_profile, prepared_sites, tmp_path_factory):
    """An untrained tiny model: its labels are scattered over the whole scan, so the rule has work to do."""
    return save_checkpoint(tmp_path_factory.mktemp("postprocess") / "model.pt",
                           build_model(tiny_profile).state_dict(), tiny_profile, class_names("3class"),
                           {"synthetic": True})


def test_an_evaluation_scores_each_case_after_the_models_postprocessing(untrained, tiny_profile, prepared_sites):
    """``evaluate_cases`` (the study, ``braintumnet evaluate``, the sites' federated evaluation) per case equals the
    case's predicted slices cleaned by the profile's rule and then scored; the rule changes the figures."""
    model, _ = load_model(untrained)
    sites = [prepared_sites["yibin"]]
    table = select_slices(sites, "test", class_names("3class"))
    labels, _ = predict_slices(model, sites, table, torch.device("cpu"), progress=False)
    reference = np.stack([item["mask"][0].numpy() for item in SliceDataset(sites, table)]).astype(np.uint8)
    dice = {}
    for rule in POSTPROCESS_RULES:
        profile = dataclasses.replace(tiny_profile, model=dataclasses.replace(tiny_profile.model, postprocess=rule))
        _, per_case = evaluate_cases(model, sites, "test", profile, torch.device("cpu"), progress=False)
        for _, row in per_case.iterrows():
            rows = (table["site"] + "/" + table["case_id"] == row["case_id"]).to_numpy()
            assert rows.any(), row["case_id"]
            z = table["z_index"].to_numpy()[rows]
            ours = segmentation_case_metrics(postprocess_case(labels[rows], z, rule), reference[rows],
                                             tuple(table[["spacing_y_mm", "spacing_x_mm"]].to_numpy()[rows][0]),
                                             float(table["spacing_z_mm"].to_numpy()[rows][0]), z)
            for key in ("dice_tumor", "dice_whole", "hd95_whole_mm", "hd_tumor_mm"):
                assert row[key] == pytest.approx(ours[key], rel=1e-6, abs=1e-9), (rule, row["case_id"], key)
        dice[rule] = per_case.set_index("case_id")[["dice_whole", "hd95_whole_mm"]]
    assert not dice["none"].equals(dice["largest-lesion"])  # the untrained model's scattered labels were cleaned


def test_evaluate_and_predict_take_another_rule_from_the_command_line(untrained, phantom_root, cache_root, tmp_path,
                                                                      capsys):
    """A site compares the rules on its own cases: ``--postprocess`` overrides the checkpoint's rule, and the outputs
    say which rule made them."""
    site = phantom_root / "yibin"
    dice = {}
    for rule in ("none", None):
        out = tmp_path / f"eval-{rule}"
        argv = ["evaluate", "--model", str(untrained), "--data", str(site), "--out", str(out), "--cache",
                str(cache_root)] + (["--postprocess", rule] if rule else [])
        assert main(argv) == 0
        written = json.loads((out / "metrics.json").read_text())
        assert written["config"]["model.postprocess"] == (rule or "largest-lesion")
        dice[rule] = written["metrics"]["hd95_whole_mm"]
    assert dice["none"] != dice[None]
    scan = sorted((site / "imagesTr").iterdir())[0]
    masks = {}
    for rule in ("none", None):
        out = tmp_path / f"pred-{rule}"
        assert main(["predict", "--model", str(untrained), "--input", str(scan), "--out", str(out)]
                    + (["--postprocess", rule] if rule else [])) == 0
        summary = json.loads(next(out.glob("*.json")).read_text())
        assert summary["postprocess"] == (rule or "largest-lesion")
        masks[rule] = np.asarray(nib.load(summary["mask"]).dataobj)
    # The default mask holds at most one lesion (face neighbours on the scan's grid; none if the largest lay in the
    # crop's padding, which the mask leaves out); the untrained model's own labels hold several.
    lesions_in = {rule: ndimage.label(mask > 0, structure=ndimage.generate_binary_structure(3, 1))[1]
                  for rule, mask in masks.items()}
    assert lesions_in[None] <= 1 < lesions_in["none"]
    assert ((masks[None] > 0) <= (masks["none"] > 0)).all()  # the rule only removes
    with pytest.raises(SystemExit) as refused:
        main(["predict", "--model", str(untrained), "--input", str(scan), "--out", str(tmp_path / "p2"),
              "--postprocess", "biggest"])
    assert refused.value.code == 2 and "biggest" in capsys.readouterr().err
