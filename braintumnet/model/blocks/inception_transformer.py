"""The Inception-Transformer stage of T-InceptionNet (§2.2), after iFormer (Si et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
from torch import nn

from braintumnet.model.blocks.attention import SelfAttention
from braintumnet.model.blocks.conv import NormFactory, layer_norm_2d


class InceptionMixer(nn.Module):
    """iFormer's token mixer: a quarter of the channels through a 3×3 convolution, a quarter through 3×3 max
    pooling and a 1×1 convolution (high frequencies), half through self-attention over the H·W tokens (low
    frequencies); the three are concatenated and projected by a 1×1 convolution.

    B×C×H×W -> B×C×H×W.

    Args:
        dim: C, divisible by 4; ``C / 2`` divisible by ``num_heads``.
        num_heads: attention heads.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim={dim} is not divisible by 4")
        self.quarter = dim // 4
        self.conv = nn.Conv2d(self.quarter, self.quarter, 3, padding=1)
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(self.quarter, self.quarter, 1))
        self.attn = SelfAttention(dim // 2, num_heads)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        to_conv, to_pool, to_attn = x.split([self.quarter, self.quarter, C // 2], dim=1)
        attended = self.attn(to_attn.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C // 2, H, W)
        return self.proj(torch.cat([self.conv(to_conv), self.pool(to_pool), attended], dim=1))


class InceptionTransformerBlock(nn.Module):
    """Pre-norm residual block: ``x = x + mixer(norm1(x))``, then ``x = x + mlp(norm2(x))`` (1×1 convolutions).

    B×C×H×W -> B×C×H×W.

    Args:
        dim: C, divisible by 4; ``C / 2`` divisible by ``num_heads``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C. Default 4.
        norm_layer: default ``layer_norm_2d``.
        act_layer: default ``nn.GELU``.

    Examples::

        >>> InceptionTransformerBlock(32, num_heads=2)(torch.zeros(2, 32, 4, 4)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: NormFactory = layer_norm_2d,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = norm_layer(dim)
        self.mixer = InceptionMixer(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), act_layer(), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))
