"""BrainTumNet's ablation switches (bench/accuracy.py): each removes exactly its part, the defaults change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from braintumnet.model import BrainTumNet
from braintumnet.model.blocks import CBAM, BTBlock, ConvNormAct, TInceptionBlock
from braintumnet.model.blocks.attention import AdaptiveMaskedAttention

TINY = {"img_size": 32, "feature_size": 8, "num_heads": 2}

ABLATION_CASES = [  # [switch, the part it removes, what replaces it]
    [{"use_transformer": False}, BTBlock, None],
    [{"use_inception": False}, TInceptionBlock, ConvNormAct],
    [{"use_cbam": False}, CBAM, None],
]


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("switch, removed, replacement", ABLATION_CASES)
def test_ablation_removes_its_part_and_keeps_the_outputs(switch, removed, replacement):
    full, ablated = BrainTumNet(**TINY), BrainTumNet(**TINY, **switch)
    assert _count(full, removed) > 0 and _count(ablated, removed) == 0
    if replacement is not None:
        assert _count(ablated, replacement) > _count(full, replacement)
    assert sum(p.numel() for p in ablated.parameters()) < sum(p.numel() for p in full.parameters()) or replacement
    out = ablated(torch.randn(2, 1, 32, 32))
    assert out.seg_logits.shape == (2, 3, 32, 32) and out.cls_logits.shape == (2, 3)
    out.seg_logits.mean().add(out.cls_logits.mean()).backward()
    assert all(p.grad is not None for p in ablated.parameters())


@pytest.mark.parametrize("gate_gradient", [True, False])
def test_gate_gradient_decides_whether_classification_trains_the_segmenter(gate_gradient):
    torch.manual_seed(0)
    model = BrainTumNet(**TINY, gate_gradient=gate_gradient)
    model(torch.randn(2, 1, 32, 32)).cls_logits.square().sum().backward()  # the classification loss alone
    seg_grads = [p.grad for p in model.pyramid.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in seg_grads)
    assert reached == gate_gradient
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_defaults_are_the_full_model():
    torch.manual_seed(0)
    default = BrainTumNet(**TINY)
    torch.manual_seed(0)
    explicit = BrainTumNet(**TINY, use_transformer=True, use_inception=True, use_cbam=True)
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert _count(default, BTBlock) == 3 and _count(default, CBAM) == 4 and _count(default, TInceptionBlock) == 3


def test_without_transformer_sparse_attention_is_a_no_op():
    model = BrainTumNet(**TINY, use_transformer=False).eval().set_sparse_attention(True)
    assert _count(model, AdaptiveMaskedAttention) == 0
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).seg_logits, model.set_sparse_attention(False)(x).seg_logits)
