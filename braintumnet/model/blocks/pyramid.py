"""Pyramid multi-scale fusion of every decoder level into the segmentation head (§2.2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from braintumnet.model.blocks.conv import ConvNormAct, GroupNorm8


class PyramidFusion(nn.Module):
    """Project each decoder level to C channels (1×1), upsample it to the finest level's size (bilinear),
    concatenate, fuse with a 3×3 convolution and classify each pixel with a 1×1 convolution.

    [B×C_i×H/2^i×W/2^i for each level i] -> B×out_channels×H×W.

    Args:
        in_channels: C_i of each level, finest first.
        channels: C, the width of each projected level and of the fusion. Must suit ``norm_layer``.
        out_channels: segmentation classes.
        norm_layer: default ``GroupNorm8``.
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
        norm_layer: type[nn.Module] = GroupNorm8,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        upsampled = [
            F.interpolate(lateral(level), size=size, mode="bilinear", align_corners=False) if i else lateral(level)
            for i, (lateral, level) in enumerate(zip(self.lateral, levels))
        ]
        return self.head(self.fuse(torch.cat(upsampled, dim=1)))
