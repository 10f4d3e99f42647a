"""Attention layers of the BT Block (§2.2): adaptive masked attention and plain multi-head self-attention.

Written from ``nn.Linear`` and tensor algebra rather than ``nn.MultiheadAttention``, so Opacus computes per-sample
gradients with its own Linear hooks (it would otherwise swap in ``DPMultiheadAttention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from braintumnet.model.blocks.adaptive_mask import AdaptiveMaskGenerator


# Below this many keys (local windows, small grids) the fused kernel's per-call cost outweighs what it saves.
FUSED_FROM_KEYS = 512


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ + key_bias) v``; ``q`` (pre-scaled): ...×M×d, ``k``, ``v``: ...×K×d, ``key_bias``: ...×K.

    The per-key bias rides in one extra channel (``[q, 1]·[k, bias] = q·k + bias``), so that
    ``scaled_dot_product_attention`` runs without an ``attn_mask``: with a mask PyTorch falls back to its plain
    math kernel, without one it takes the fused flash kernel (CPU and CUDA), about 3× faster in training and 4× in
    inference at the ``paper`` width's 1024 tokens, and the M×K logits are never stored for backward. The bias still
    gets its gradient, through the extra key channel. On CUDA the channels are padded to a multiple of 8, which the
    fused kernels need. Fewer than ``FUSED_FROM_KEYS`` keys take the explicit softmax, which is faster there.
    """
    *batch, M, d = q.shape
    K = k.shape[-2]
    if K < FUSED_FROM_KEYS:
        logits = q @ k.transpose(-2, -1) + key_bias.unsqueeze(-2)
        return logits.softmax(dim=-1) @ v
    extra = 1 if q.device.type == "cpu" else 8 - d % 8
    ones = q.new_ones(*batch, M, 1)
    pad = (0, extra - 1)
    q_ = F.pad(torch.cat([q, ones], dim=-1), pad).reshape(-1, 1, M, d + extra)
    k_ = F.pad(torch.cat([k, key_bias.unsqueeze(-1).to(k.dtype)], dim=-1), pad).reshape(-1, 1, K, d + extra)
    v_ = F.pad(v, (0, extra)).reshape(-1, 1, K, d + extra)
    out = F.scaled_dot_product_attention(q_, k_, v_, scale=1.0)
    return out[..., :d].reshape(*batch, M, d)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor, size: tuple[int, int], window_size: int
) -> torch.Tensor:
    """Attention inside non-overlapping ``window_size``² windows of the H×W token grid (Swin's W-MSA, no shift).

    A grid that the window does not divide is padded; padded keys get a bias of -inf and padded queries are
    cropped. B×h×N×d (N = H·W) -> B×h×N×d.
    """
    B, h, N, d = q.shape
    H, W = size
    wh, ww = min(window_size, H), min(window_size, W)
    pad_h, pad_w = -H % wh, -W % ww
    Hp, Wp = H + pad_h, W + pad_w

    def to_windows(t: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        c = t.shape[-1]
        t = F.pad(t.reshape(B, h, H, W, c), (0, 0, 0, pad_w, 0, pad_h), value=value)
        t = t.reshape(B, h, Hp // wh, wh, Wp // ww, ww, c).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(B, h, -1, wh * ww, c)

    out = attend(to_windows(q), to_windows(k), to_windows(v), to_windows(key_bias.unsqueeze(-1), -math.inf)[..., 0])
    out = out.reshape(B, h, Hp // wh, Wp // ww, wh, ww, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, Hp, Wp, d)
    return out[:, :, :H, :W].reshape(B, h, N, d)


def topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, num_keys: int
) -> torch.Tensor:
    """Global attention over only the ``num_keys`` most important tokens of each head (gathered, not masked).

    ``scores`` are the mask generator's logits, B×h×N. Costs N·num_keys attention entries instead of N².
    B×h×N×d -> B×h×N×d.
    """
    B, h, N, d = k.shape
    index = scores.topk(num_keys, dim=-1).indices
    kv_index = index.unsqueeze(-1).expand(B, h, num_keys, d)
    key_bias = F.logsigmoid(scores.gather(-1, index))
    return attend(q, k.gather(2, kv_index), v.gather(2, kv_index), key_bias)


class AdaptiveMaskedAttention(nn.Module):
    """Local-window and global sparse attention, both modulated by adaptive soft masks and mixed by learnt weights.

    The ``AdaptiveMaskGenerator`` scores every token for every head; ``log(mask)`` is added to the attention logits
    over keys of both branches. Mixing weights are a softmax over two logits per head, predicted from the mean token
    by a zero-initialised ``nn.Linear`` (so both branches start at 0.5): the paper's "learnable weight parameters"
    that select the computation "for the current input features", and a Linear rather than a raw ``nn.Parameter``
    so that Opacus hooks see it. Training and plain evaluation are dense. With ``sparse_inference = True`` and the
    module in eval mode, the global branch keeps only ``ceil(topk_ratio · N)`` keys per head (``topk_attention``);
    ``num_global_keys`` records how many the last call used. Where one window covers the whole grid the local
    branch is the dense global one, computed once (the mixing weights then have nothing to choose between).

    B×N×C (N = H·W) -> B×N×C.

    Args:
        dim: C, divisible by ``num_heads``.
        num_heads: attention heads.
        window_size: side of the local windows, in tokens. Default 4.
        topk_ratio: fraction of tokens kept as global keys in sparse inference, in (0, 1]. Default 0.5.
        mask_generator: the mask generator type, called with ``(dim, num_heads)``. Default ``AdaptiveMaskGenerator``.

    Examples::

        >>> attn = AdaptiveMaskedAttention(64, num_heads=4, window_size=4)
        >>> attn(torch.zeros(2, 64, 64), size=(8, 8)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 4,
        topk_ratio: float = 0.5,
        mask_generator: type[nn.Module] = AdaptiveMaskGenerator,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio={topk_ratio}: use a value in (0, 1]")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size, self.topk_ratio = window_size, topk_ratio
        self.sparse_inference = False
        self.num_global_keys = 0
        self.mask_generator = mask_generator(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mixer = nn.Linear(dim, 2 * num_heads)
        nn.init.zeros_(self.mixer.weight)
        nn.init.zeros_(self.mixer.bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        scores = self.mask_generator.scores(x)
        key_bias = F.logsigmoid(scores)  # log(mask), exact where sigmoid would round to 0
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = q * self.scale
        glob = self.global_attention(q, k, v, scores, key_bias)
        single_window = self.window_size >= max(size) and self.num_global_keys == N
        local = glob if single_window else window_attention(q, k, v, key_bias, size, self.window_size)
        mix = self.mixer(x.mean(dim=1)).reshape(B, self.num_heads, 2, 1, 1).softmax(dim=2)
        out = mix[:, :, 0] * local + mix[:, :, 1] * glob
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def global_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        N = k.shape[2]
        if self.sparse_inference and not self.training:
            self.num_global_keys = max(1, math.ceil(self.topk_ratio * N))
            return topk_attention(q, k, v, scores, self.num_global_keys)
        self.num_global_keys = N
        return attend(q, k, v, key_bias)


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over all tokens (timm's ``Attention``), from ``nn.Linear``.

    B×N×C -> B×N×C.

    Args:
        dim: C, divisible by ``num_heads``.
        num_heads: attention heads.

    Examples::

        >>> SelfAttention(64, num_heads=4)(torch.zeros(2, 16, 64)).shape
        torch.Size([2, 16, 64])
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
