"""Pyramid multi-scale fusion of every decoder level into the segmentation head (§2.2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from braintumnet.model.blocks.conv import NormFactory, group_norm


class PyramidFusion(nn.Module):
    """Feature-pyramid fusion: project each decoder level to C channels (1×1; identity where it already has C),
    then top-down from the coarsest, upsample ×2 (bilinear) and add the next finer level; normalise, activate and
    classify each pixel (1×1).

    Every level reaches the head. Adding 1×1 projections is the same linear map as a 1×1 convolution over their
    concatenation, and the top-down path upsamples only once to full resolution; the decoder levels already carry
    3×3 context.

    [B×C_i×H/2^i×W/2^i for each level i] -> B×out_channels×H×W.

    Args:
        in_channels: C_i of each level, finest first.
        channels: C, the width of the fused map. Must suit ``norm_layer``.
        out_channels: segmentation classes.
        norm_layer: default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.

    Examples::

        >>> pyramid = PyramidFusion([8, 16], channels=8, out_channels=3)
        >>> pyramid([torch.zeros(2, 8, 32, 32), torch.zeros(2, 16, 16, 16)]).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        out_channels: int,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Identity() if c == channels else nn.Conv2d(c, channels, 1, bias=False) for c in in_channels
        )
        self.norm = norm_layer(channels)
        self.act = act_layer()
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        *finer, fused = [lateral(level) for lateral, level in zip(self.lateral, levels)]
        for level in reversed(finer):
            fused = level + F.interpolate(fused, size=level.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.act(self.norm(fused)))
