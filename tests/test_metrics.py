"""Metrics: agreement with MONAI and scikit-learn, the empty-mask convention, 3-D scoring of whole scans, case
pooling, names and JSON."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_iou
from monai.metrics.utils import get_edge_surface_distance
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from braintumnet.metrics import (
    HD_PENALTY_MM,
    METRIC_NAMES,
    EvaluationAccumulator,
    case_probabilities,
    classification_metrics,
    evaluation_summary,
    segmentation_case_metrics,
    summarize_cases,
)

# MONAI's compute_hausdorff_distance passes a deprecated argument to its own get_mask_edges (MONAI 1.5-1.6).
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

REGIONS = {"tumor": (1,), "edema": (2,), "whole": (1, 2)}
CLASSES = ("glioma", "metastasis", "meningioma")


def random_labels(rng: np.random.Generator, shape=(3, 48, 40), smooth=3.0) -> np.ndarray:
    """Blobby label maps: edema (2) around tumour (1), several components, sometimes none in a slice."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=(0, smooth, smooth))
    field /= field.std()
    labels = np.zeros(shape, dtype=np.int64)
    labels[field > 0.6] = 2
    labels[field > 1.2] = 1
    return labels


def perturbed(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """A plausible prediction: the reference, shifted, with some labels flipped."""
    pred = np.roll(labels, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(1, 2)).copy()
    flip = rng.random(labels.shape) < 0.02
    pred[flip] = rng.integers(0, 3, flip.sum())
    return pred


def onehot_regions(labels: np.ndarray) -> torch.Tensor:
    """S×H×W labels -> 1×3×S×H×W one-hot of the regions, as MONAI wants it (batch, channel, spatial)."""
    return torch.from_numpy(np.stack([np.isin(labels, r) for r in REGIONS.values()]))[None].float()


def onehot_slice(labels2d: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.isin(labels2d, r) for r in REGIONS.values()]))[None].float()


# --- segmentation: agreement with MONAI -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_dice_and_iou_agree_with_monai(seed):
    rng = np.random.default_rng(seed)
    target = random_labels(rng)
    pred = perturbed(rng, target)
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0))
    # The case is one volume of its slices: Dice and IoU pool its voxels.
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    dice = dice_metric(onehot_regions(pred), onehot_regions(target))[0]
    iou = compute_iou(onehot_regions(pred), onehot_regions(target), include_background=True, ignore_empty=False)[0]
    for r, region in enumerate(REGIONS):
        assert ours[f"dice_{region}"] == pytest.approx(float(dice[r]), rel=1e-6)
        assert ours[f"iou_{region}"] == pytest.approx(float(iou[r]), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.9, 0.7), (2.5, 0.4)])
def test_single_slice_hausdorff_equals_monai(seed, spacing):
    rng = np.random.default_rng(seed)
    target = random_labels(rng, shape=(1, 64, 56))
    pred = perturbed(rng, target)
    ours = segmentation_case_metrics(pred, target, spacing)
    for r, region in enumerate(REGIONS):
        if not (np.isin(pred, REGIONS[region]).any() and np.isin(target, REGIONS[region]).any()):
            continue  # MONAI gives inf/NaN for an empty mask; the empty policy is tested below
        for percentile, key in ((95, f"hd95_{region}_mm"), (None, f"hd_{region}_mm")):
            expected = compute_hausdorff_distance(
                onehot_slice(pred[0]), onehot_slice(target[0]), include_background=True,
                percentile=percentile, directed=False, spacing=spacing,
            )[0, r]
            assert ours[key] == pytest.approx(float(expected), rel=1e-5, abs=1e-5), (region, percentile)


def test_masks_touching_the_image_border_match_monai():
    """Outside the image is background: a mask cut by the border has an edge along it, as in MONAI."""
    target = np.zeros((1, 24, 20), dtype=np.int64)
    target[0, :10, :] = 2
    target[0, :6, 12:] = 1
    pred = np.zeros_like(target)
    pred[0, 2:13, 1:] = 2
    pred[0, :5, 10:] = 1
    ours = segmentation_case_metrics(pred, target, (1.2, 0.7))
    for percentile, key in ((95, "hd95_{}_mm"), (None, "hd_{}_mm")):
        expected = compute_hausdorff_distance(onehot_slice(pred[0]), onehot_slice(target[0]), include_background=True,
                                              percentile=percentile, spacing=(1.2, 0.7))[0]
        for r, region in enumerate(REGIONS):
            assert ours[key.format(region)] == pytest.approx(float(expected[r]), rel=1e-5), (region, percentile)


@pytest.mark.parametrize("seed", range(3))
def test_multi_slice_pools_in_plane_distances(seed):
    """HD is the largest in-plane distance of any slice; HD95 = the larger per-direction 95th percentile of the
    distances pooled over the slices (MONAI's definition applied to the pooled surface)."""
    rng = np.random.default_rng(100 + seed)
    target = random_labels(rng, shape=(4, 48, 48), smooth=4.0)
    target[:, 20:28, 20:28] = 1  # every slice holds tumour and edema, so every slice has both surfaces
    target[:, 17:31, 17:31][target[:, 17:31, 17:31] == 0] = 2
    pred = perturbed(rng, target)
    pred[:, 21:27, 21:27] = 1
    spacing = (0.8, 1.1)
    ours = segmentation_case_metrics(pred, target, spacing)
    for r, region in enumerate(REGIONS):
        per_slice_hd = [
            float(compute_hausdorff_distance(onehot_slice(p), onehot_slice(t), include_background=True,
                                             spacing=spacing)[0, r])
            for p, t in zip(pred, target)
        ]
        assert ours[f"hd_{region}_mm"] == pytest.approx(max(per_slice_hd), rel=1e-6)
        pooled = [[], []]
        for p, t in zip(pred, target):
            _, distances, _ = get_edge_surface_distance(
                torch.from_numpy(np.isin(p, REGIONS[region])), torch.from_numpy(np.isin(t, REGIONS[region])),
                spacing=spacing, symmetric=True,
            )
            for direction, d in enumerate(distances):
                pooled[direction].append(d.numpy())
        expected = max(np.percentile(np.concatenate(d), 95) for d in pooled)
        assert ours[f"hd95_{region}_mm"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_iou_never_exceeds_dice(seed):
    rng = np.random.default_rng(seed)
    target = random_labels(rng, shape=(2, 32, 32), smooth=2.0)
    pred = random_labels(rng, shape=(2, 32, 32), smooth=2.0) if seed % 2 else perturbed(rng, target)
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0))
    for region in REGIONS:
        dice, iou = ours[f"dice_{region}"], ours[f"iou_{region}"]
        assert iou <= dice + 1e-12
        assert iou == pytest.approx(dice / (2 - dice), abs=1e-12)


# --- segmentation: hand-computed distances and the empty-mask policy ---------------------------------------------


def square(shape=(1, 20, 30), rows=slice(5, 11), cols=slice(5, 11), label=1) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int64)
    labels[:, rows, cols] = label
    return labels


def test_shifted_square_hand_computed():
    # A 6×6 square moved 3 columns right: every edge pixel that moved is 3 columns from the other edge at most.
    target, pred = square(), square(cols=slice(8, 14))
    ours = segmentation_case_metrics(pred, target, (1.0, 0.5))
    assert ours["hd_tumor_mm"] == pytest.approx(1.5)
    assert ours["dice_tumor"] == pytest.approx(2 * 18 / 72)  # overlap 6×3 of two 36-pixel squares
    assert ours["iou_tumor"] == pytest.approx(18 / 54)


@pytest.mark.parametrize("factor", [0.5, 2.0, 3.7])
def test_distances_scale_with_spacing(factor):
    rng = np.random.default_rng(7)
    target = random_labels(rng, shape=(2, 40, 40))
    pred = perturbed(rng, target)
    base = segmentation_case_metrics(pred, target, (1.0, 0.6))
    scaled = segmentation_case_metrics(pred, target, (factor, 0.6 * factor))
    for key, value in base.items():
        expected = value * factor if key.startswith("hd") else value
        assert scaled[key] == pytest.approx(expected, rel=1e-5), key


def test_anisotropic_spacing_uses_the_right_axis():
    target = square()
    down, right = square(rows=slice(7, 13)), square(cols=slice(7, 13))  # moved 2 rows / 2 columns
    spacing = (3.0, 0.5)  # (rows, columns)
    assert segmentation_case_metrics(down, target, spacing)["hd_tumor_mm"] == pytest.approx(6.0)
    assert segmentation_case_metrics(right, target, spacing)["hd_tumor_mm"] == pytest.approx(1.0)


@pytest.mark.parametrize("spacing_z", [None, 2.0])
def test_missed_tumour_scores_zero_and_the_penalty(spacing_z):
    """BraTS: a region in the reference and nowhere in the prediction scores Dice 0 and HD = HD95 = 374 mm."""
    target, pred = np.concatenate([square(label=1)] * 3), np.zeros((3, 20, 30), dtype=np.int64)
    assert HD_PENALTY_MM == 374.0
    ours = segmentation_case_metrics(pred, target, (0.9, 0.7), spacing_z)
    assert ours["dice_tumor"] == 0.0 and ours["iou_tumor"] == 0.0
    assert ours["hd_tumor_mm"] == HD_PENALTY_MM and ours["hd95_tumor_mm"] == HD_PENALTY_MM
    # No edema anywhere: both empty, a perfect score.
    assert (ours["dice_edema"], ours["iou_edema"], ours["hd_edema_mm"], ours["hd95_edema_mm"]) == (1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("spacing_z", [None, 2.0])
def test_false_positive_on_empty_reference_scores_zero_and_the_penalty(spacing_z):
    pred, target = square(label=2), np.zeros((1, 20, 30), dtype=np.int64)
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z)
    assert ours["dice_edema"] == 0.0 and ours["iou_edema"] == 0.0
    assert ours["hd_edema_mm"] == HD_PENALTY_MM and ours["hd95_edema_mm"] == HD_PENALTY_MM
    assert ours["dice_whole"] == 0.0 and ours["hd_whole_mm"] == HD_PENALTY_MM


@pytest.mark.parametrize("spacing_z", [None, 2.0])
def test_both_empty_is_perfect(spacing_z):
    empty = np.zeros((3, 16, 16), dtype=np.int64)
    ours = segmentation_case_metrics(empty, empty, (1.0, 1.0), spacing_z)
    for region in REGIONS:
        assert ours[f"dice_{region}"] == 1.0 and ours[f"iou_{region}"] == 1.0
        assert ours[f"hd_{region}_mm"] == 0.0 and ours[f"hd95_{region}_mm"] == 0.0


def test_tumour_missed_in_one_slice_of_separate_slices():
    """Slices with no through-plane neighbour (no slice spacing): the surface of a slice whose tumour is missed has
    nothing to match in its own plane and sits at the penalty; the other slice stays exact."""
    target = np.concatenate([square(), square()])
    pred = target.copy()
    pred[1] = 0
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0))
    assert ours["dice_tumor"] == pytest.approx(2 * 36 / (36 + 72))
    assert ours["hd_tumor_mm"] == HD_PENALTY_MM
    assert ours["hd95_tumor_mm"] == HD_PENALTY_MM  # half of the GT surface is unmatched


def test_tumour_missed_in_one_slice_of_a_volume_is_measured_in_3d():
    """In a contiguous stack the missed slice's surface is measured to the neighbouring slice's, in mm along z."""
    target = np.concatenate([square(), square()])
    pred = target.copy()
    pred[1] = 0
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=4.0)
    assert ours["dice_tumor"] == pytest.approx(2 * 36 / (36 + 72))
    assert ours["hd_tumor_mm"] == pytest.approx(4.0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.7, 2.5), (1.2, 1.2, 6.0)])
def test_3d_case_equals_monai(seed, spacing):
    """A contiguous stack with a slice spacing is one volume: Dice, IoU, HD and HD95 are MONAI's 3-D figures."""
    rng = np.random.default_rng(200 + seed)
    field = gaussian_filter(rng.standard_normal((10, 44, 40)), sigma=(1.5, 3.0, 3.0))
    field /= field.std()
    target = np.where(field > 1.2, 1, np.where(field > 0.6, 2, 0))
    pred = np.roll(target, (int(rng.integers(-1, 2)), 1, -2), axis=(0, 1, 2))
    pred[rng.random(pred.shape) < 0.01] = 1
    *in_plane, spacing_z = spacing
    ours = segmentation_case_metrics(pred, target, in_plane, spacing_z_mm=spacing_z)
    monai_spacing = (spacing_z, *in_plane)  # array axis order: slices, rows, columns
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(onehot_regions(pred),
                                                                                     onehot_regions(target))[0]
    for percentile, key in ((95, "hd95_{}_mm"), (None, "hd_{}_mm")):
        expected = compute_hausdorff_distance(onehot_regions(pred), onehot_regions(target), include_background=True,
                                              percentile=percentile, spacing=monai_spacing)[0]
        for r, region in enumerate(REGIONS):
            assert ours[key.format(region)] == pytest.approx(float(expected[r]), rel=1e-5, abs=1e-5), (region, key)
            assert ours[f"dice_{region}"] == pytest.approx(float(dice[r]), rel=1e-6)


@pytest.mark.parametrize("spacing_z", [1.0, 3.0, 6.5])
def test_slice_spacing_sets_the_through_plane_distance(spacing_z):
    """A box predicted one slice too high: every surface distance is along z, so HD is the slice spacing."""
    target = np.zeros((8, 20, 20), dtype=np.int64)
    target[2:6, 5:15, 5:15] = 1
    pred = np.roll(target, 1, axis=0)
    ours = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=spacing_z)
    assert ours["hd_tumor_mm"] == pytest.approx(spacing_z)
    assert ours["hd95_tumor_mm"] == pytest.approx(spacing_z)
    assert ours["dice_tumor"] == pytest.approx(2 * 3 / 8)


def test_slices_with_a_gap_are_never_bridged():
    """Representative slices far apart (z 10 and 30): each is scored in-plane, as without a slice spacing."""
    target = np.concatenate([square(), square(cols=slice(6, 12))])
    pred = np.concatenate([square(cols=slice(8, 14)), square(cols=slice(6, 12))])
    gapped = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=1.0, z_index=[10, 30])
    assert gapped == segmentation_case_metrics(pred, target, (1.0, 1.0))
    assert gapped["hd_tumor_mm"] == pytest.approx(3.0)
    # Neighbours 1 mm apart: the shifted slice's far edge is nearer to the other slice's square (sqrt(1 + 2²) mm).
    neighbours = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=1.0, z_index=[10, 11])
    assert neighbours["hd_tumor_mm"] == pytest.approx(math.sqrt(5))


def test_a_false_positive_on_a_tumour_free_slice_lowers_the_score():
    """The whole scan is scored: a lesion predicted on a slice with no tumour is a false positive and a far surface."""
    target = np.zeros((12, 20, 30), dtype=np.int64)
    target[4:7] = square(shape=(3, 20, 30))
    pred = target.copy()
    clean = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=3.0)
    pred[10, 2:5, 20:24] = 1  # a small false lesion 4 slices above the tumour
    noisy = segmentation_case_metrics(pred, target, (1.0, 1.0), spacing_z_mm=3.0)
    assert clean["dice_tumor"] == 1.0 and clean["hd_tumor_mm"] == 0.0
    assert noisy["dice_tumor"] == pytest.approx(2 * 108 / (2 * 108 + 12))
    # Its farthest voxel (z 10, row 2, column 23) from the tumour's nearest surface voxel (z 6, row 5, column 10).
    assert noisy["hd_tumor_mm"] == pytest.approx(math.sqrt((3 * 4) ** 2 + 3**2 + 13**2))


def test_a_repeated_slice_is_refused():
    labels = np.zeros((2, 8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="same axial slice"):
        segmentation_case_metrics(labels, labels, (1.0, 1.0), spacing_z_mm=2.0, z_index=[3, 3])


@pytest.mark.parametrize(
    "pred, target, spacing, message",
    [
        [np.full((1, 4, 4), 3), np.zeros((1, 4, 4), int), (1.0, 1.0), r"label\(s\) \[3\]"],
        [np.zeros((1, 4, 4), int), np.full((1, 4, 4), -1), (1.0, 1.0), r"label\(s\) \[-1\]"],
        [np.zeros((1, 4, 4), int), np.zeros((1, 4, 5), int), (1.0, 1.0), "same S×H×W shape"],
        [np.zeros((4, 4), int), np.zeros((4, 4), int), (1.0, 1.0), "S×H×W label map"],
        [np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), (1.0, 0.0), "spacing_mm"],
        [np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), (1.0, 1.0, 1.0), "spacing_mm"],
    ],
)
def test_segmentation_ill_arg(pred, target, spacing, message):
    with pytest.raises(ValueError, match=message):
        segmentation_case_metrics(pred, target, spacing)
    if "spacing" not in message:
        return
    with pytest.raises(ValueError, match="spacing_z_mm"):
        segmentation_case_metrics(np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), (1.0, 1.0), spacing_z_mm=-1.0)


# --- classification: agreement with scikit-learn ------------------------------------------------------------------


def random_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    logits = rng.standard_normal((n, k))
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3])
def test_classification_agrees_with_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, 40)])  # every class present
    probs = random_probs(rng, y.size, k)
    pred = probs.argmax(1)
    ours = classification_metrics(y, probs, CLASSES[:k])
    assert ours["acc"] == pytest.approx(accuracy_score(y, pred))
    assert ours["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert ours["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    expected_auc = roc_auc_score(y, probs[:, 1]) if k == 2 else roc_auc_score(y, probs, multi_class="ovr")
    assert ours["auc"] == pytest.approx(expected_auc)
    assert ours["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    cm = np.asarray(ours["confusion_matrix"])
    specificity = [(cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]) / (cm.sum() - cm[c].sum()) for c in range(k)]
    assert ours["specificity"] == pytest.approx(np.mean(specificity))
    for c, name in enumerate(CLASSES[:k]):
        assert ours[f"specificity_{name}"] == pytest.approx(specificity[c])


def test_binary_specificity_is_sensitivity_of_the_other_class():
    y = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    ours = classification_metrics(y, probs, ("glioma", "metastasis"))
    assert ours["sensitivity_metastasis"] == pytest.approx(1 / 2)
    assert ours["specificity_metastasis"] == pytest.approx(2 / 3)
    assert ours["specificity_glioma"] == pytest.approx(ours["sensitivity_metastasis"])


def test_absent_class_gives_nan_auc_and_a_warning(caplog):
    y = np.array([0, 1, 0, 1, 1])  # no meningioma
    probs = random_probs(np.random.default_rng(0), 5, 3)
    with caplog.at_level(logging.WARNING, logger="braintumnet.metrics"):
        ours = classification_metrics(y, probs, CLASSES)
    assert math.isnan(ours["auc"]) and "meningioma" in caplog.text
    assert math.isnan(ours["auc_meningioma"]) and not math.isnan(ours["auc_glioma"])
    # Recall of an absent class is undefined and left out of the mean, not counted as 0.
    pred = probs.argmax(1)
    expected = np.mean([np.mean(pred[y == c] == c) for c in (0, 1)])
    assert ours["sensitivity"] == pytest.approx(expected)
    assert np.asarray(ours["confusion_matrix"]).shape == (3, 3)


@pytest.mark.parametrize(
    "y, probs, message",
    [
        [np.array([0, 1]), np.full((2, 2), 0.5), "n×K"],
        [np.array([0, 3]), np.full((2, 3), 1 / 3), "class index 3"],
        [np.array([], dtype=int), np.zeros((0, 3)), "at least one"],
    ],
)
def test_classification_ill_arg(y, probs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, probs, CLASSES)


# --- aggregation ---------------------------------------------------------------------------------------------------


def test_case_probabilities_pool_the_slices_in_use_or_all():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.4, 0.6], [0.3, 0.7]])
    use = np.array([False, True, False, False, False])
    ids, case_probs = case_probabilities(probs, ["a", "a", "a", "b", "b"], weights=use)
    assert ids == ["a", "b"]
    np.testing.assert_allclose(case_probs, [[0.2, 0.8], [0.35, 0.65]])  # b has no slice in use: all of its slices
    with pytest.raises(ValueError, match="one value per slice"):
        case_probabilities(probs, ["a"] * 5, weights=use[:3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        case_probabilities(probs, ["a"] * 5, weights=[1, -1, 0, 0, 0])


def test_case_probabilities_weight_slices_by_predicted_area():
    # A speck of 2 pixels on a tumour-free slice must not outvote the 98-pixel slice through the tumour.
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    ids, case_probs = case_probabilities(probs, ["a", "a", "a"], weights=[98, 2, 0])
    np.testing.assert_allclose(case_probs, [[0.1 * 0.98 + 0.8 * 0.02, 0.9 * 0.98 + 0.2 * 0.02]])
    assert case_probs[0].argmax() == 1
    np.testing.assert_allclose(case_probs.sum(axis=1), 1.0)


def test_case_probabilities_mean_in_order_of_first_appearance():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.4, 0.6], [0.3, 0.7]])
    ids, case_probs = case_probabilities(probs, ["b", "a", "b", "a", "c"])
    assert ids == ["b", "a", "c"]
    np.testing.assert_allclose(case_probs, [[0.7, 0.3], [0.3, 0.7], [0.3, 0.7]])


def test_summarize_cases_means_numeric_keys():
    rows = [{"case_id": "a", "dice_tumor": 1.0, "n": 2}, {"case_id": "b", "dice_tumor": 0.5, "n": 4}]
    assert summarize_cases(rows) == {"dice_tumor": 0.75, "n": 3.0, "n_cases": 2}


def synthetic_evaluation(seed=0, n_cases=6, slices=3, size=32):
    rng = np.random.default_rng(seed)
    target = random_labels(rng, shape=(n_cases * slices, size, size), smooth=2.5)
    pred = perturbed(rng, target)
    case_labels = np.arange(n_cases) % 3
    labels = np.repeat(case_labels, slices)
    probs = random_probs(rng, labels.size, 3)
    probs[np.arange(labels.size), labels] += 1.0  # mostly right
    probs /= probs.sum(1, keepdims=True)
    case_ids = [f"case{i:02d}" for i in np.repeat(np.arange(n_cases), slices)]
    spacing = np.tile([0.9, 0.8], (labels.size, 1))
    return pred, target, probs, labels, case_ids, spacing


def test_evaluation_summary_names_values_and_json():
    pred, target, probs, labels, case_ids, spacing = synthetic_evaluation()
    out, per_case = evaluation_summary(pred, target, probs, labels, case_ids, spacing, CLASSES)
    assert tuple(out)[: len(METRIC_NAMES)] == METRIC_NAMES
    assert out["n_cases"] == 6 and out["n_slices"] == 18 and len(per_case) == 6
    for key in ("iou_edema", "hd95_whole_mm", "slice_acc", "slice_auc", "dice_tumor_glioma", "auc_meningioma",
                "confusion_matrix", "dice_tumor_median", "hd95_tumor_median_mm", "miss_rate_tumor", "acc_all_slices",
                "auc_all_slices"):
        assert key in out
    # Plain Python values only: what json writes is what json reads back.
    assert json.loads(json.dumps(out)) == out
    assert all(type(v) in (float, int, list) for v in out.values())

    # Per-case segmentation means, case-level classification from mean slice probabilities.
    per_case_ref = [segmentation_case_metrics(pred[i : i + 3], target[i : i + 3], (0.9, 0.8)) for i in range(0, 18, 3)]
    assert out["dice_tumor"] == pytest.approx(np.mean([m["dice_tumor"] for m in per_case_ref]))
    assert out["hd95_tumor_mm"] == pytest.approx(np.mean([m["hd95_tumor_mm"] for m in per_case_ref]))
    np.testing.assert_allclose(per_case["dice_tumor"], [m["dice_tumor"] for m in per_case_ref])
    _, case_probs = case_probabilities(probs, case_ids, weights=(pred == 1).sum(axis=(1, 2)))
    np.testing.assert_allclose(per_case[[f"prob_{c}" for c in CLASSES]].to_numpy(), case_probs)
    assert out["acc"] == pytest.approx(classification_metrics(labels[::3], case_probs, CLASSES)["acc"])
    through = (target == 1).any(axis=(1, 2))
    assert out["slice_acc"] == pytest.approx(accuracy_score(labels[through], probs[through].argmax(1)))
    glioma = [m["dice_tumor"] for m, c in zip(per_case_ref, labels[::3]) if c == 0]
    assert out["dice_tumor_glioma"] == pytest.approx(np.mean(glioma)) and out["n_cases_glioma"] == len(glioma)
    assert per_case["label"].tolist() == [CLASSES[c] for c in labels[::3]]


def test_tumor_types_name_the_per_type_means():
    pred, target, probs, labels, case_ids, spacing = synthetic_evaluation()
    types = ["gbm" if c == 0 else "other" for c in labels]
    out, per_case = evaluation_summary(pred, target, probs, labels, case_ids, spacing, CLASSES, tumor_types=types)
    assert "dice_tumor_gbm" in out and "dice_tumor_other" in out and "dice_tumor_glioma" not in out
    assert out["n_cases_gbm"] + out["n_cases_other"] == out["n_cases"]
    assert set(per_case["tumor_type"]) == {"gbm", "other"}


def test_accumulator_streams_interleaved_batches():
    pred, target, probs, labels, case_ids, spacing = synthetic_evaluation(seed=1)
    whole, _ = evaluation_summary(pred, target, probs, labels, case_ids, (0.9, 0.8), CLASSES)
    order = np.random.default_rng(0).permutation(len(case_ids))  # slices of a case spread over batches
    acc = EvaluationAccumulator(CLASSES)
    for batch in np.array_split(order, 4):
        acc.update(torch.from_numpy(pred[batch]), torch.from_numpy(target[batch][:, None]),
                   torch.from_numpy(probs[batch]), torch.from_numpy(labels[batch]), [case_ids[i] for i in batch],
                   {c: (0.9, 0.8) for c in set(case_ids)})
    streamed = acc.summary()
    for key in METRIC_NAMES:
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9), key
    assert len(acc.case_rows()) == 6


def test_accumulator_rejects_inconsistent_cases():
    pred, target, probs, labels, case_ids, spacing = synthetic_evaluation()
    bad_labels = labels.copy()
    bad_labels[1] = (bad_labels[1] + 1) % 3
    with pytest.raises(ValueError, match="case00.*class labels"):
        evaluation_summary(pred, target, probs, bad_labels, case_ids, spacing, CLASSES)
    bad_spacing = spacing.copy()
    bad_spacing[1] = (1.0, 1.0)
    with pytest.raises(ValueError, match="case00.*spacings"):
        evaluation_summary(pred, target, probs, labels, case_ids, bad_spacing, CLASSES)
    with pytest.raises(ValueError, match="no entry for case"):
        evaluation_summary(pred, target, probs, labels, case_ids, {"case00": (1.0, 1.0)}, CLASSES)
    with pytest.raises(ValueError, match="integer labels"):
        evaluation_summary(pred.astype(float), target, probs, labels, case_ids, spacing, CLASSES)


# --- whole-scan evaluation: 3-D cases, misses, medians, case classification ----------------------------------------


def scan_case(rng, depth=12, size=24, lesion=True):
    """A contiguous stack of slices with a tumour (1) inside edema (2) on a few of them, and its perturbed copy."""
    target = np.zeros((depth, size, size), dtype=np.int64)
    if lesion:
        z0 = int(rng.integers(2, depth - 5))
        target[z0:z0 + 4, 6:18, 6:18] = 2
        target[z0:z0 + 3, 9:15, 9:15] = 1
    pred = np.roll(target, int(rng.integers(-1, 2)), axis=2)
    return pred, target


def test_summary_reports_medians_and_the_miss_rate():
    rng = np.random.default_rng(3)
    cases = [scan_case(rng) for _ in range(3)]
    cases[0] = (np.zeros_like(cases[0][1]), cases[0][1])  # the first case is missed entirely
    pred, target = np.concatenate([c[0] for c in cases]), np.concatenate([c[1] for c in cases])
    case_ids = [f"c{i}" for i in range(3) for _ in range(12)]
    labels = np.zeros(36, dtype=int)
    probs = np.tile([0.7, 0.2, 0.1], (36, 1))
    z = np.tile(np.arange(12), 3)
    out, per_case = evaluation_summary(pred, target, probs, labels, case_ids, (1.0, 1.0), CLASSES, z_index=z,
                                       spacing_z_mm=2.0)
    each = [segmentation_case_metrics(p, t, (1.0, 1.0), 2.0) for p, t in cases]
    assert each[0]["dice_tumor"] == 0.0 and each[0]["hd95_tumor_mm"] == HD_PENALTY_MM
    assert out["dice_tumor"] == pytest.approx(np.mean([m["dice_tumor"] for m in each]))
    assert out["dice_tumor_median"] == pytest.approx(np.median([m["dice_tumor"] for m in each]))
    assert out["hd95_tumor_median_mm"] == pytest.approx(np.median([m["hd95_tumor_mm"] for m in each]))
    assert out["hd95_tumor_mm"] > out["hd95_tumor_median_mm"]  # the miss pulls the mean, not the median
    assert out["miss_rate_tumor"] == pytest.approx(1 / 3) and out["miss_rate_whole"] == pytest.approx(1 / 3)
    assert per_case["missed_tumor"].tolist() == [True, False, False]


def test_miss_rate_counts_only_cases_with_the_reference_region():
    rng = np.random.default_rng(4)
    pred, target = scan_case(rng)
    no_edema = target.copy()
    no_edema[no_edema == 2] = 0
    out, per_case = evaluation_summary(np.concatenate([pred, pred]), np.concatenate([target, no_edema]),
                                       np.full((24, 3), 1 / 3), np.zeros(24, int), ["a"] * 12 + ["b"] * 12,
                                       (1.0, 1.0), CLASSES, spacing_z_mm=3.0)
    assert per_case["missed_edema"].tolist() == [False, None]
    assert out["miss_rate_edema"] == 0.0 and math.isnan(
        evaluation_summary(np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int), np.full((2, 3), 1 / 3),
                           np.zeros(2, int), ["a", "a"], (1.0, 1.0), CLASSES)[0]["miss_rate_tumor"])


def test_case_type_pools_the_slices_with_predicted_tumour():
    """Most slices of a scan show no lesion; the type comes from the slices where the model predicts tumour."""
    rng = np.random.default_rng(5)
    pred, target = scan_case(rng)
    with_tumour = (pred == 1).any(axis=(1, 2))
    probs = np.where(with_tumour[:, None], [[0.1, 0.8, 0.1]], [[0.6, 0.3, 0.1]])
    out, per_case = evaluation_summary(pred, target, probs, np.ones(12, int), ["a"] * 12, (1.0, 1.0), CLASSES,
                                       spacing_z_mm=2.0)
    np.testing.assert_allclose(per_case[["prob_glioma", "prob_metastasis"]].to_numpy()[0], [0.1, 0.8])
    assert out["acc"] == 1.0 and out["acc_all_slices"] == 0.0
    # Gated by the whole lesion instead: edema slices count too.
    _, whole = evaluation_summary(pred, target, probs, np.ones(12, int), ["a"] * 12, (1.0, 1.0), CLASSES,
                                  spacing_z_mm=2.0, gate_labels=(1, 2))
    lesion = (pred > 0).any(axis=(1, 2))
    assert whole["prob_metastasis"][0] == pytest.approx(probs[lesion, 1].mean())


def test_3d_accumulator_streams_batches_in_any_order():
    rng = np.random.default_rng(6)
    cases = [scan_case(rng) for _ in range(4)]
    pred, target = np.concatenate([c[0] for c in cases]), np.concatenate([c[1] for c in cases])
    pred[0, 1:3, 1:3] = 1  # a false positive on a tumour-free slice (every lesion starts at z >= 2)
    case_ids = [f"c{i}" for i in range(4) for _ in range(12)]
    z = np.tile(np.arange(12), 4)
    # Distinct probabilities: with ties (all 1/3) the AUC would rank cases by the last bit of a sum's order.
    probs, labels = random_probs(np.random.default_rng(1), 48, 3), np.repeat([0, 1, 2, 0], 12)
    whole, rows = evaluation_summary(pred, target, probs, labels, case_ids, (0.9, 0.8), CLASSES, z_index=z,
                                     spacing_z_mm=4.0)
    acc = EvaluationAccumulator(CLASSES)
    for batch in np.array_split(np.random.default_rng(0).permutation(48), 5):
        acc.update(pred[batch], target[batch], probs[batch], labels[batch], [case_ids[i] for i in batch],
                   (0.9, 0.8), z_index=z[batch], spacing_z_mm=4.0)
    streamed = acc.summary()
    for key in (*METRIC_NAMES, "hd95_whole_mm", "dice_tumor_median", "miss_rate_tumor"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9), key
    # In 3-D the false positive is a far surface; scored slice by slice it would be the penalty.
    _, in_plane = evaluation_summary(pred, target, probs, labels, case_ids, (0.9, 0.8), CLASSES, z_index=z)
    assert in_plane["hd_tumor_mm"][0] == HD_PENALTY_MM and 8.0 < rows["hd_tumor_mm"][0] < 60.0


def test_closed_cases_keep_their_metrics_and_refuse_more_slices():
    rng = np.random.default_rng(7)
    pred, target = scan_case(rng)
    expected = segmentation_case_metrics(pred, target, (1.0, 1.0), 2.0)
    acc = EvaluationAccumulator(CLASSES)
    acc.update(pred, target, np.full((12, 3), 1 / 3), np.zeros(12, int), ["a"] * 12, (1.0, 1.0),
               z_index=np.arange(12), spacing_z_mm=2.0)
    acc.close(["a"])
    row = acc.case_rows()[0]
    assert all(row[k] == pytest.approx(v) for k, v in expected.items())
    with pytest.raises(ValueError, match="closed"):
        acc.update(pred[:1], target[:1], np.full((1, 3), 1 / 3), [0], ["a"], (1.0, 1.0), z_index=[20],
                   spacing_z_mm=2.0)


def test_summary_of_some_cases_equals_their_own_evaluation():
    """Per-site figures of a pooled evaluation are the figures each site's cases get on their own."""
    rng = np.random.default_rng(8)
    cases = [scan_case(rng) for _ in range(4)]
    pred, target = np.concatenate([c[0] for c in cases]), np.concatenate([c[1] for c in cases])
    case_ids = [f"{'ab'[i // 2]}/c{i}" for i in range(4) for _ in range(12)]
    rng_probs = random_probs(rng, 48, 3)
    labels = np.repeat([0, 1, 1, 2], 12)
    acc = EvaluationAccumulator(CLASSES)
    acc.update(pred, target, rng_probs, labels, case_ids, (1.0, 1.0), spacing_z_mm=3.0)
    part = acc.summary(only=["a/c0", "a/c1"])
    alone, _ = evaluation_summary(pred[:24], target[:24], rng_probs[:24], labels[:24], case_ids[:24], (1.0, 1.0),
                                  CLASSES, spacing_z_mm=3.0)
    assert part["n_cases"] == 2 and part["n_slices"] == 24
    for key in (*METRIC_NAMES, "slice_acc", "dice_tumor_median"):
        assert part[key] == pytest.approx(alone[key], nan_ok=True), key


def test_mean_and_sd_over_repetitions_leave_undefined_metrics_out():
    from braintumnet.metrics import mean_sd, mean_sd_columns, mean_sd_tree

    assert mean_sd([0.5, float("nan"), None, 0.7]) == pytest.approx((0.6, math.sqrt(0.02), 2))
    assert mean_sd([0.4]) == (0.4, 0.0, 1)
    assert all(math.isnan(v) for v in mean_sd([float("nan"), None])[:2])
    means, sds = mean_sd_tree([{"a": {"acc": 0.5, "auc": float("nan")}, "b": {}},
                               {"a": {"acc": 0.7, "auc": 0.9}, "b": {}}])
    assert means == {"a": {"acc": pytest.approx(0.6), "auc": 0.9}, "b": {}}
    assert sds["a"] == {"acc": pytest.approx(math.sqrt(0.02)), "auc": 0.0}
    columns = mean_sd_columns([{"acc": 0.5, "n_cases": 3, "cm": [[1]], "ok": True}, {"acc": 0.7, "n_cases": 3,
                                                                                      "cm": [[1]], "ok": True}])
    assert columns == {"acc": {"mean": pytest.approx(0.6), "sd": pytest.approx(math.sqrt(0.02))},
                       "n_cases": {"mean": 3.0, "sd": 0.0}}
