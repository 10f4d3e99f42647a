"""MultiTaskLoss: hand-computed values, validated weights, components, switched-off terms."""

from __future__ import annotations

import math

import pytest
import torch

from braintumnet.losses import LossOutput, MultiTaskLoss, class_log_prior

# Zero logits: every class has probability 1/C. seg target 1×1×4 = [0, 1, 2, 2], C = 3.
#   Dice loss of tumour: 1 - 2·(1/3) / (4/3 + 1) = 5/7; of edema: 1 - 2·(2/3) / (4/3 + 2) = 3/5;
#   of background: 1 - 2·(1/3) / (4/3 + 1) = 5/7.  CE = ln 3 for every pixel and for the classifier (K = 3).
_UNIFORM_SEG = (torch.zeros(1, 3, 1, 4), torch.tensor([[[0, 1, 2, 2]]]))
_UNIFORM_CLS = (torch.zeros(1, 3), torch.tensor([2]))
_DICE_FG = (5 / 7 + 3 / 5) / 2
_DICE_ALL = (5 / 7 + 5 / 7 + 3 / 5) / 3
_LN3 = math.log(3)

HAND_CASES = [
    # kwargs, expected (total, seg, cls)
    [{}, (_DICE_FG + _LN3 + 0.7 * _LN3, _DICE_FG + _LN3, _LN3)],
    [{"include_background": True}, (_DICE_ALL + _LN3 + 0.7 * _LN3, _DICE_ALL + _LN3, _LN3)],
    [{"weight_seg": 2.0, "weight_cls": 0.5}, (2 * (_DICE_FG + _LN3) + 0.5 * _LN3, _DICE_FG + _LN3, _LN3)],
    [{"lambda_dice": 0.0}, (_LN3 + 0.7 * _LN3, _LN3, _LN3)],
    [{"weight_cls": 0.0}, (_DICE_FG + _LN3, _DICE_FG + _LN3, _LN3)],
    [{"weight_seg": 0.0}, (0.7 * _LN3, _DICE_FG + _LN3, _LN3)],
]


@pytest.mark.parametrize("kwargs, expected", HAND_CASES)
def test_hand_computed_values(kwargs, expected):
    out = MultiTaskLoss(**kwargs)(*_UNIFORM_SEG, *_UNIFORM_CLS)
    assert isinstance(out, LossOutput)
    torch.testing.assert_close(torch.stack(list(out)), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_two_class_half_probability():
    # 1×2×1×2 zero logits, target [0, 1]: Dice of the foreground 1 - 2·0.5/(1 + 1) = 0.5, CE = ln 2.
    out = MultiTaskLoss()(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]), torch.zeros(1, 2), torch.tensor([0]))
    torch.testing.assert_close(out.seg, torch.tensor(0.5 + math.log(2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.total, torch.tensor(0.5 + math.log(2) + 0.7 * math.log(2)), rtol=1e-4, atol=1e-5)


def test_confident_correct_prediction_is_near_zero():
    target = torch.tensor([[[0, 1], [2, 2]]])
    seg_logits = 20.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    out = MultiTaskLoss()(seg_logits, target, torch.tensor([[0.0, 20.0]]), torch.tensor([1]))
    assert out.total.item() < 1e-4


def test_channel_target_equals_plain_target():
    torch.manual_seed(0)
    seg_logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    cls_logits, cls_target = torch.randn(2, 3), torch.tensor([0, 2])
    loss_fn = MultiTaskLoss()
    a = loss_fn(seg_logits, target, cls_logits, cls_target)
    b = loss_fn(seg_logits, target.unsqueeze(1), cls_logits, cls_target)
    torch.testing.assert_close(torch.stack(list(a)), torch.stack(list(b)))


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("size", [(1, 8, 8), (4, 16, 24)])
def test_components_scalars_and_gradients(K, size):
    B, H, W = size
    seg_logits = torch.randn(B, 3, H, W, requires_grad=True)
    cls_logits = torch.randn(B, K, requires_grad=True)
    out = MultiTaskLoss()(seg_logits, torch.randint(0, 3, (B, H, W)), cls_logits, torch.randint(0, K, (B,)))
    assert all(t.shape == () for t in out)
    torch.testing.assert_close(out.total, 1.0 * out.seg + 0.7 * out.cls)
    out.total.backward()
    assert seg_logits.grad.abs().sum() > 0 and cls_logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        [{"weight_seg": -1.0}, "weight_seg.*-1.0"],
        [{"weight_cls": -0.5}, "weight_cls.*-0.5"],
        [{"weight_cls": float("nan")}, "weight_cls.*nan"],
        [{"weight_seg": float("inf")}, "weight_seg.*inf"],
        [{"weight_seg": 0.0, "weight_cls": 0.0}, "both be 0"],
        [{"lambda_dice": -1.0}, "lambda_dice"],
    ],
)
def test_ill_arg(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskLoss(**kwargs)


@pytest.mark.parametrize(
    "seg_target, cls_logits, cls_target",
    [
        [torch.zeros(2, 8, 9, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)],
        [torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(3, 3), torch.zeros(2, dtype=torch.long)],
        [torch.zeros(2, 8, 8, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)],
    ],
)
def test_ill_shape(seg_target, cls_logits, cls_target):
    with pytest.raises(ValueError, match="must be"):
        MultiTaskLoss()(torch.zeros(2, 3, 8, 8), seg_target, cls_logits, cls_target)


def test_switched_off_classification_ignores_a_nan_head():
    """Stage one of the two-stage schedule: the classifier's output must not poison the segmentation loss."""
    seg_logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    cls_logits = torch.full((2, 3), float("nan"), requires_grad=True)
    out = MultiTaskLoss(weight_cls=0.0)(seg_logits, torch.randint(0, 3, (2, 8, 8)), cls_logits, torch.tensor([0, 1]))
    assert torch.isfinite(out.total) and torch.isnan(out.cls)
    out.total.backward()
    assert torch.isfinite(seg_logits.grad).all() and cls_logits.grad is None


def test_switched_off_segmentation_ignores_a_nan_head():
    seg_logits = torch.full((2, 3, 8, 8), float("nan"), requires_grad=True)
    cls_logits = torch.randn(2, 3, requires_grad=True)
    out = MultiTaskLoss(weight_seg=0.0)(seg_logits, torch.randint(0, 3, (2, 8, 8)), cls_logits, torch.tensor([0, 1]))
    assert torch.isfinite(out.total)
    torch.testing.assert_close(out.total, 0.7 * out.cls)
    out.total.backward()
    assert torch.isfinite(cls_logits.grad).all() and seg_logits.grad is None


def test_half_precision_logits_give_float32_loss():
    out = MultiTaskLoss()(
        torch.randn(2, 3, 8, 8).half(), torch.randint(0, 3, (2, 8, 8)), torch.randn(2, 3).half(), torch.tensor([0, 1])
    )
    assert all(t.dtype == torch.float32 for t in out)


def test_logit_adjustment_is_cross_entropy_on_prior_shifted_logits():
    prior = class_log_prior([0, 0, 0, 0, 0, 0, 1, 1, 2], 3)
    torch.testing.assert_close(prior.exp().sum(), torch.tensor(1.0))
    assert prior[0] > prior[1] > prior[2] > -math.inf  # one pseudo-count per class: a missing class stays finite
    seg, target = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 2])
    adjusted = MultiTaskLoss(class_log_prior=prior, logit_adjustment=0.5)(seg, target, logits, labels)
    expected = torch.nn.functional.cross_entropy(logits + 0.5 * prior, labels)
    torch.testing.assert_close(adjusted.cls, expected)
    # tau 0 (the default) is the paper's plain cross-entropy, whatever the prior.
    plain = MultiTaskLoss(class_log_prior=prior, logit_adjustment=0.0)(seg, target, logits, labels)
    torch.testing.assert_close(plain.cls, torch.nn.functional.cross_entropy(logits, labels))
    # The majority class's logit gains the most, so its adjusted loss is lower: the model needs less of its own
    # logit for it, which is what removes the site's prior from the learned logits.
    only_majority = torch.zeros(1, 3), torch.tensor([0])
    loss = MultiTaskLoss(class_log_prior=prior, logit_adjustment=1.0)(seg[:1], target[:1], *only_majority)
    assert loss.cls < math.log(3)
    with pytest.raises(ValueError, match="logit_adjustment"):
        MultiTaskLoss(logit_adjustment=-1.0)
    with pytest.raises(ValueError, match="classes"):
        MultiTaskLoss(class_log_prior=prior[:2], logit_adjustment=1.0)(seg, target, logits, labels)
