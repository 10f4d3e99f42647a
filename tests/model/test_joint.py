"""The joint model's links between segmenter and classifier: the gate, the shared features, and their gradients."""

from __future__ import annotations

import pytest
import torch

from braintumnet.model import BrainTumNet
from braintumnet.model.blocks.gated_pooling import GatedPooling, GradientScale

TINY = {"img_size": 32, "feature_size": 8, "num_heads": 2}


@pytest.mark.parametrize("scale", [0.0, 0.25, 1.0])
def test_gradient_scale_scales_only_the_backward_pass(scale):
    x = torch.arange(4.0, requires_grad=True)
    y = GradientScale(scale)(x)
    assert torch.equal(y, x)
    (3 * y + x).sum().backward()  # + x: a path that always carries gradient, so scale 0 can be checked too
    assert torch.allclose(x.grad, torch.full((4,), 3 * scale + 1))


def test_gradient_scale_refuses_a_scale_outside_0_1():
    with pytest.raises(ValueError, match="scale=1.5"):
        GradientScale(1.5)


def test_gated_pooling_averages_inside_the_gate_and_over_the_slice():
    features = torch.zeros(1, 2, 4, 4)
    features[0, :, :2, :2] = 1.0  # the top-left quarter holds 1s
    gate = torch.zeros(1, 1, 16, 16)
    gate[0, 0, :8, :8] = 1.0  # the gate covers that quarter
    pooled = GatedPooling(eps=0.0)(features, gate)
    assert torch.allclose(pooled, torch.tensor([[1.0, 1.0, 0.25, 0.25]]))


def _encoder_gradient(model: BrainTumNet) -> float:
    """The classification loss alone, backwards: how much of it reaches the first encoder stage."""
    torch.manual_seed(0)
    model(torch.randn(2, 1, 32, 32)).cls_logits.square().sum().backward()
    return sum(float(p.grad.abs().sum()) for p in model.enc1.parameters() if p.grad is not None)


def test_shared_features_let_classification_train_the_encoder_scaled():
    full = BrainTumNet(**TINY, gate_gradient=False, shared_features=True, shared_gradient=1.0)
    torch.manual_seed(1)
    scaled = BrainTumNet(**TINY, gate_gradient=False, shared_features=True, shared_gradient=0.1)
    scaled.load_state_dict(full.state_dict())
    g_full, g_scaled = _encoder_gradient(full), _encoder_gradient(scaled)
    assert g_full > 0
    assert g_scaled == pytest.approx(0.1 * g_full, rel=1e-3)
    assert _encoder_gradient(BrainTumNet(**TINY, gate_gradient=False, shared_features=True,
                                         shared_gradient=0.0)) == 0.0
    assert _encoder_gradient(BrainTumNet(**TINY, gate_gradient=False)) == 0.0


def test_two_stage_never_lets_classification_train_the_segmenter():
    model = BrainTumNet(**TINY, mode="two-stage", shared_features=True, shared_gradient=1.0)
    assert _encoder_gradient(model) == 0.0
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_gate_floor_shows_the_classifier_the_slice_where_the_segmenter_finds_nothing():
    model = BrainTumNet(**TINY, gate_floor=0.2).eval()
    seen = {}
    model.classifier.stem.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))  # returns None
    x = torch.rand(1, 1, 32, 32) + 0.5
    seg = torch.full((1, 3, 32, 32), -20.0)
    seg[:, 0] = 20.0  # background everywhere: the tumour gate is ~0
    model.forward_classification(x, seg)
    gate = seen["x"][:, 1:]
    assert torch.allclose(gate, torch.full_like(gate, 0.2), atol=1e-6)
    assert torch.allclose(seen["x"][:, :1], 0.2 * x, atol=1e-6)


@pytest.mark.parametrize("bad, message", [({"shared_gradient": 2.0}, "shared_gradient=2.0"),
                                          ({"gate_floor": 1.0}, "gate_floor=1.0")])
def test_ill_arg(bad, message):
    with pytest.raises(ValueError, match=message):
        BrainTumNet(**TINY, **bad)
