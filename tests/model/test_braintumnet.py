"""BrainTumNet: shapes, ill arguments, gradients in both modes, sparse inference, Opacus and the config contract."""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from braintumnet.config import GATE_REGIONS, MODEL_MODES, PROFILES, ModelConfig
from braintumnet.model import GATE_LABELS, MODES, BrainTumNet, BrainTumNetOutput
from braintumnet.model.blocks import AdaptiveMaskedAttention

TINY = dict(feature_size=8, num_heads=2)

SHAPE_CASES = [  # [constructor kwargs, input shape, expected seg shape, expected cls shape]
    [dict(img_size=32, num_classes=3, gate_region="tumor", mode="multitask"), (2, 1, 32, 32), (2, 3, 32, 32), (2, 3)],
    [dict(img_size=32, num_classes=2, gate_region="whole", mode="two-stage"), (2, 1, 32, 32), (2, 3, 32, 32), (2, 2)],
    [dict(img_size=48, num_classes=3, gate_region="edema", mode="two-stage"), (1, 1, 48, 48), (1, 3, 48, 48), (1, 3)],
    [dict(img_size=48, num_classes=2, gate_region="tumor", mode="multitask"), (3, 1, 48, 48), (3, 3, 48, 48), (3, 2)],
    [dict(img_size=64, num_classes=3, gate_region="whole", mode="multitask"), (2, 1, 64, 64), (2, 3, 64, 64), (2, 3)],
    [dict(img_size=64, num_classes=2, gate_region="edema", mode="two-stage"), (2, 1, 64, 64), (2, 3, 64, 64), (2, 2)],
    [dict(img_size=32, in_channels=2, seg_classes=2, num_heads=4), (2, 2, 32, 32), (2, 2, 32, 32), (2, 3)],
    [dict(img_size=64, window_size=3, topk_ratio=0.2), (2, 1, 64, 48), (2, 3, 64, 48), (2, 3)],
]


def tiny(**kwargs) -> BrainTumNet:
    return BrainTumNet(**{**TINY, "img_size": 32, **kwargs})


def joint_loss(out: BrainTumNetOutput, seg: torch.Tensor, label: torch.Tensor, w_cls: float = 0.7) -> torch.Tensor:
    return F.cross_entropy(out.seg_logits, seg) + w_cls * F.cross_entropy(out.cls_logits, label)


def batch(B: int = 2, size: int = 32, K: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(B, 1, size, size), torch.randint(0, 3, (B, size, size)), torch.randint(0, K, (B,))


@pytest.mark.parametrize("kwargs, input_shape, seg_shape, cls_shape", SHAPE_CASES)
def test_shape(kwargs, input_shape, seg_shape, cls_shape):
    model = BrainTumNet(**{**TINY, **kwargs}).eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert isinstance(out, BrainTumNetOutput)
    assert out.seg_logits.shape == seg_shape and out.cls_logits.shape == cls_shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=40), "img_size=40"),
        (dict(img_size=8), "img_size=8"),
        (dict(feature_size=12), "feature_size=12"),
        (dict(feature_size=0), "feature_size=0"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(num_heads=0), "num_heads=0"),
        (dict(num_classes=4), "num_classes=4"),
        (dict(num_classes=1), "num_classes=1"),
        (dict(gate_region="core"), "gate_region='core'"),
        (dict(mode="cascade"), "mode='cascade'"),
        (dict(topk_ratio=0.0), "topk_ratio=0.0"),
        (dict(topk_ratio=1.5), "topk_ratio=1.5"),
        (dict(window_size=0), "window_size=0"),
        (dict(seg_classes=2, gate_region="edema"), "seg_classes=2"),
        (dict(in_channels=0), "in_channels=0"),
        (dict(dropout_rate=1.0), "dropout_rate=1.0"),
    ],
)
def test_ill_arg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_side_not_a_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="40"):
        tiny()(torch.zeros(1, 1, 40, 32))


def test_multitask_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = tiny(img_size=64, window_size=2)  # a 4×4 window would cover the 4×4 bottleneck: local = global
    x, seg, label = batch(size=64)
    joint_loss(model(x), seg, label).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not missing
    zero = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero


def test_multitask_classification_trains_the_segmenter_through_the_attached_gate():
    model = tiny(gate_gradient=True)
    x, _, label = batch()
    F.cross_entropy(model(x).cls_logits, label).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.segmentation_parameters())


def test_two_stage_classification_does_not_train_the_segmenter():
    model = tiny(mode="two-stage")
    x, _, label = batch()
    F.cross_entropy(model(x).cls_logits, label).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.segmentation_parameters())
    assert all(p.grad is not None for p in model.classification_parameters())


def test_parameter_groups_split_the_model():
    model = tiny(mode="two-stage")
    seg = {id(p) for p in model.segmentation_parameters()}
    cls = {id(p) for p in model.classification_parameters()}
    assert seg and cls and not seg & cls
    assert seg | cls == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("region", GATE_REGIONS)
def test_gate_is_the_region_probability(region):
    model = tiny(gate_region=region)
    logits = torch.randn(2, 3, 32, 32)
    gate = model.gate(logits)
    expected = logits.softmax(dim=1)[:, list(GATE_LABELS[region])].sum(dim=1, keepdim=True)
    torch.testing.assert_close(gate, expected)
    assert (gate > 0).all() and (gate < 1).all()


def attention_modules(model: nn.Module) -> list[AdaptiveMaskedAttention]:
    return [m for m in model.modules() if isinstance(m, AdaptiveMaskedAttention)]


def test_sparse_inference_keeps_top_k_keys_in_eval_only():
    model = tiny(img_size=64, topk_ratio=0.25).set_sparse_attention(True)
    x = torch.randn(2, 1, 64, 64)
    model.train()
    model(x)
    tokens = [m.num_global_keys for m in attention_modules(model)]
    assert tokens == [16, 16, 64]  # bottleneck 4×4 twice, dec4 8×8: dense while training
    model.eval()
    # The math kernel, made of matmuls that FlopCounterMode counts (it does not count the CPU flash kernel).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        sparse = model(x)
        assert [m.num_global_keys for m in attention_modules(model)] == [math.ceil(0.25 * n) for n in tokens]
        with FlopCounterMode(display=False) as sparse_flops:
            model(x)
        model.set_sparse_attention(False)
        dense = model(x)
        with FlopCounterMode(display=False) as dense_flops:
            model(x)
    assert sparse.seg_logits.shape == dense.seg_logits.shape and sparse.cls_logits.shape == dense.cls_logits.shape
    assert sparse_flops.get_total_flops() < dense_flops.get_total_flops()


def test_no_batchnorm_and_opacus_validates():
    from opacus.validators import ModuleValidator

    model = tiny()
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert ModuleValidator.validate(model, strict=False) == []


def test_every_trainable_layer_has_an_opacus_grad_sampler():
    from opacus import GradSampleModule

    own_params = [m for m in tiny().modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    assert own_params and all(type(m) in GradSampleModule.GRAD_SAMPLERS for m in own_params)  # no functorch fallback


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_match_a_loop():
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = tiny(dropout_rate=0.0)
    x, seg, label = batch(B=2)
    gsm = GradSampleModule(model, loss_reduction="sum")
    out = gsm(x)
    seg_loss = F.cross_entropy(out.seg_logits, seg, reduction="sum") / seg[0].numel()  # per-sample mean over pixels
    (seg_loss + F.cross_entropy(out.cls_logits, label, reduction="sum")).backward()
    grad_samples = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    gsm.disable_hooks()
    for i in range(2):
        model.zero_grad()
        joint_loss(model(x[i : i + 1]), seg[i : i + 1], label[i : i + 1], w_cls=1.0).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grad_samples[name][i], p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_docstring_example_runs():
    import braintumnet.model.braintumnet as module

    assert doctest.testmod(module).failed == 0


def test_model_config_fields_are_constructor_keywords():
    signature = inspect.signature(BrainTumNet)
    network = [f for f in dataclasses.fields(ModelConfig) if f.name != "postprocess"]  # applied to the output
    assert "postprocess" not in signature.parameters
    for field in network:
        assert signature.parameters[field.name].default == field.default, field.name
    assert set(GATE_LABELS) == set(GATE_REGIONS) and tuple(MODES) == tuple(MODEL_MODES)
    profile = PROFILES["quick"]
    model = BrainTumNet(img_size=profile.data.img_size, **{f.name: getattr(profile.model, f.name) for f in network})
    assert model(torch.zeros(1, 1, 64, 64)).seg_logits.shape == (1, 3, 64, 64)
