"""BrainTumNet's blocks: shapes, the attention maths against hand-built references, and the ill arguments."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from braintumnet.model.blocks import (
    CBAM,
    AdaptiveMaskedAttention,
    AdaptiveMaskGenerator,
    BTBlock,
    DecoderStage,
    EncoderStage,
    InceptionMixer,
    InceptionTransformerBlock,
    MultiKernelConv,
    PyramidFusion,
    SelfAttention,
    TInceptionBlock,
    TInceptionNet,
)
from braintumnet.model.blocks.attention import attend, topk_attention, window_attention

SHAPE_CASES = [  # [block, input shape, expected output shape]
    [MultiKernelConv(1, 8), (2, 1, 16, 16), (2, 8, 16, 16)],
    [MultiKernelConv(8, 8), (2, 8, 16, 12), (2, 8, 16, 12)],
    [EncoderStage(8, 16), (2, 8, 16, 16), (2, 16, 8, 8)],
    [BTBlock(16, num_heads=2, window_size=4), (2, 16, 8, 8), (2, 16, 8, 8)],
    [BTBlock(16, num_heads=4, window_size=4), (2, 16, 5, 3), (2, 16, 5, 3)],  # padded windows
    [CBAM(16), (2, 16, 8, 8), (2, 16, 8, 8)],
    [TInceptionBlock(8, 16), (2, 8, 8, 8), (2, 16, 8, 8)],
    [InceptionTransformerBlock(32, num_heads=2), (2, 32, 4, 4), (2, 32, 4, 4)],
    [TInceptionNet(2, num_classes=3, feature_size=8, num_heads=2), (2, 2, 32, 32), (2, 3)],
    [TInceptionNet(3, num_classes=2, feature_size=8, num_heads=4), (2, 3, 48, 48), (2, 2)],
]


@pytest.mark.parametrize("block, input_shape, expected_shape", SHAPE_CASES)
def test_shape(block, input_shape, expected_shape):
    assert block(torch.randn(input_shape)).shape == expected_shape


def test_decoder_stage_and_pyramid_shapes():
    stage = DecoderStage(32, 16, 16, transformer=BTBlock(16, num_heads=2))
    assert stage(torch.randn(2, 32, 4, 4), torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)
    pyramid = PyramidFusion([8, 16, 32], channels=8, out_channels=3)
    levels = [torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    assert pyramid(levels).shape == (2, 3, 32, 32)


def test_soft_masks_are_in_open_unit_interval():
    generator = AdaptiveMaskGenerator(16, num_heads=4)
    mask = generator(3 * torch.randn(2, 10, 16))
    assert mask.shape == (2, 4, 10)
    assert (mask > 0).all() and (mask < 1).all()


@pytest.mark.parametrize("masked_keys", [0, 5])
def test_fused_attention_matches_the_explicit_softmax_and_its_gradients(masked_keys):
    """From ``FUSED_FROM_KEYS`` keys on, ``attend`` runs the bias through a fused kernel; the values and every
    gradient, the mask generator's bias included, must be those of ``softmax(q kᵀ + bias) v``."""
    from braintumnet.model.blocks.attention import FUSED_FROM_KEYS

    torch.manual_seed(0)
    n = FUSED_FROM_KEYS + 8
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 2, n, dtype=torch.float64)
    bias[..., :masked_keys] = -math.inf  # keys no query may see, as padded windows have
    bias.requires_grad_()
    grad = torch.randn(2, 2, n, 8, dtype=torch.float64)

    def run(fn):
        for t in (q, k, v, bias):
            t.grad = None
        out = fn()
        out.backward(grad)
        return out.detach(), *(t.grad.clone() for t in (q, k, v, bias))

    fused = run(lambda: attend(q, k, v, bias))
    explicit = run(lambda: (q @ k.transpose(-2, -1) + bias.unsqueeze(-2)).softmax(-1) @ v)
    for a, b in zip(fused, explicit):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b)


def test_window_attention_matching_the_grid_is_dense_attention():
    q, k, v = torch.randn(3, 2, 2, 16, 8).unbind(0)
    bias = torch.randn(2, 2, 16)
    torch.testing.assert_close(window_attention(q, k, v, bias, (4, 4), window_size=4), attend(q, k, v, bias))
    torch.testing.assert_close(window_attention(q, k, v, bias, (4, 4), window_size=9), attend(q, k, v, bias))


def test_window_attention_stays_inside_its_window():
    H, W = 5, 6  # window 4 pads both sides
    q, k, v = torch.randn(3, 1, 2, H * W, 8).unbind(0)
    bias = torch.zeros(1, 2, H * W)
    out = window_attention(q, k, v, bias, (H, W), window_size=4)
    v2 = v.clone().reshape(1, 2, H, W, 8)
    v2[:, :, 4:, 4:] += 100.0  # only the bottom-right window sees this
    out2 = window_attention(q, k, v2.reshape(1, 2, H * W, 8), bias, (H, W), window_size=4)
    changed = (out2 - out).abs().amax(dim=(0, 1, 3)).reshape(H, W) > 1e-4
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[4:, 4:] = True
    assert torch.equal(changed, expected)
    assert out.isfinite().all()


def test_topk_attention_equals_dense_attention_restricted_to_the_top_keys():
    q, k, v = torch.randn(3, 2, 2, 12, 4).unbind(0)
    scores = torch.randn(2, 2, 12)
    dense = attend(q, k, v, torch.nn.functional.logsigmoid(scores))
    torch.testing.assert_close(topk_attention(q, k, v, scores, num_keys=12), dense)
    kept = scores >= scores.topk(5, dim=-1).values[..., -1:]
    masked_bias = torch.nn.functional.logsigmoid(scores).masked_fill(~kept, -math.inf)
    torch.testing.assert_close(topk_attention(q, k, v, scores, num_keys=5), attend(q, k, v, masked_bias))


def test_sparse_inference_gathers_fewer_keys_only_in_eval():
    attn = AdaptiveMaskedAttention(16, num_heads=2, window_size=4, topk_ratio=0.25)
    x = torch.randn(2, 64, 16)
    attn.sparse_inference = True
    attn.train()
    attn(x, (8, 8))
    assert attn.num_global_keys == 64  # training stays dense
    attn.eval()
    assert attn(x, (8, 8)).shape == (2, 64, 16)
    assert attn.num_global_keys == 16
    attn.sparse_inference = False
    attn(x, (8, 8))
    assert attn.num_global_keys == 64


def test_mixing_starts_even_and_is_learnt_per_head():
    attn = AdaptiveMaskedAttention(16, num_heads=2, window_size=4)
    x = torch.randn(2, 64, 16)
    attn(x, (8, 8)).square().sum().backward()  # 4 windows: local and global differ
    assert attn.mixer.weight.grad is not None and attn.mixer.weight.grad.abs().sum() > 0
    weights = attn.mixer(x.mean(dim=1)).reshape(2, 2, 2).softmax(dim=-1)
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))


def test_self_attention_matches_explicit_softmax():
    attn = SelfAttention(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj(attend(q * 4**-0.5, k, v, torch.zeros(B, 2, N)).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: AdaptiveMaskedAttention(10, num_heads=4), "dim=10"),
        (lambda: AdaptiveMaskedAttention(16, num_heads=4, topk_ratio=0.0), "topk_ratio=0.0"),
        (lambda: SelfAttention(10, num_heads=3), "dim=10"),
        (lambda: TInceptionBlock(8, 10), "out_channels=10"),
        (lambda: InceptionMixer(18, num_heads=1), "dim=18"),
    ],
)
def test_ill_arg(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "module_name",
    [
        "adaptive_mask",
        "attention",
        "bt_block",
        "cbam",
        "conv",
        "decoder_stage",
        "inception_transformer",
        "multikernel_conv",
        "pyramid",
        "t_inception",
        "t_inceptionnet",
    ],
)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(f"braintumnet.model.blocks.{module_name}")
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
