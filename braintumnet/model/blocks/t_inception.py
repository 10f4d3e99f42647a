"""The T-Inception Block of the T-InceptionNet classification module (§2.2)."""

from __future__ import annotations

import torch
from torch import nn

from braintumnet.model.blocks.conv import NormFactory, group_norm

BRANCH_KERNELS = ((1, 1), (3, 3), (1, 3), (3, 1))


class TInceptionBlock(nn.Module):
    """Parallel 1×1, 3×3, 1×3 and 3×1 convolutions of C_out/4 channels each, concatenated, normalised and
    activated, plus a (1×1 when the width changes) shortcut. Downsampling, when wanted, comes before it
    (``TInceptionNet`` puts a 2×2 max pool there).

    B×C_in×H×W -> B×C_out×H×W.

    Args:
        in_channels: C_in.
        out_channels: C_out, divisible by 4.
        norm_layer: default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.

    Examples::

        >>> TInceptionBlock(8, 16)(torch.zeros(2, 8, 16, 16)).shape
        torch.Size([2, 16, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        if out_channels % len(BRANCH_KERNELS):
            raise ValueError(f"out_channels={out_channels} is not divisible by {len(BRANCH_KERNELS)}")
        width = out_channels // len(BRANCH_KERNELS)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, width, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
            for kh, kw in BRANCH_KERNELS
        )
        self.norm = norm_layer(out_channels)
        self.act = act_layer()
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi_scale = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.act(self.norm(multi_scale) + self.shortcut(x))
