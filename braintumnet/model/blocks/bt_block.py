"""The BT Block (§2.2): adaptive masked attention, then self-attention, then an MLP, each pre-norm and residual."""

from __future__ import annotations

import torch
from torch import nn

from braintumnet.model.blocks.attention import AdaptiveMaskedAttention, SelfAttention


class Mlp(nn.Sequential):
    """Linear -> activation -> Linear (timm's ``Mlp``). B×N×C -> B×N×C.

    Args:
        dim: C.
        hidden_ratio: hidden width / C. Default 4.
        act_layer: default ``nn.GELU``.
    """

    def __init__(self, dim: int, hidden_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU):
        hidden = int(dim * hidden_ratio)
        super().__init__(nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, dim))


class BTBlock(nn.Module):
    """BrainTumNet's transformer block on a feature map: its pixels are the patch tokens.

    The feature map is flattened to H·W tokens (the encoder's strided convolutions are the patch embedding), then::

        x = x + masked_attn(norm1(x))   # AdaptiveMaskedAttention: local windows + global sparse, soft masks
        x = x + attn(norm2(x))          # SelfAttention over all tokens
        x = x + mlp(norm3(x))

    B×C×H×W -> B×C×H×W.

    Args:
        dim: C, divisible by ``num_heads``.
        num_heads: attention heads.
        window_size: local window side, in tokens. Default 4.
        topk_ratio: fraction of keys kept by sparse inference. Default 0.5.
        mlp_ratio: MLP hidden width / C. Default 4.
        norm_layer: default ``nn.LayerNorm``.
        act_layer: MLP activation. Default ``nn.GELU``.

    Examples::

        >>> BTBlock(64, num_heads=4)(torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 4,
        topk_ratio: float = 0.5,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.masked_attn = AdaptiveMaskedAttention(dim, num_heads, window_size, topk_ratio)
        self.norm2 = norm_layer(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_ratio, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.masked_attn(self.norm1(tokens), (H, W))
        tokens = tokens + self.attn(self.norm2(tokens))
        tokens = tokens + self.mlp(self.norm3(tokens))
        return tokens.transpose(1, 2).reshape(B, C, H, W)
