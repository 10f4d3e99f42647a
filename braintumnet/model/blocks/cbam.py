"""CBAM on the skip connections (§2.2; Woo et al., ECCV 2018): channel attention, then spatial attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAttention(nn.Module):
    """A shared MLP scores each channel from its average- and max-pooled values; their sum, through a sigmoid,
    scales the channels. B×C×H×W -> B×C×H×W.

    Args:
        channels: C.
        reduction: MLP hidden width is ``max(C // reduction, 4)``. Default 8.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        avg, peak = F.adaptive_avg_pool2d(x, 1).reshape(B, C), F.adaptive_max_pool2d(x, 1).reshape(B, C)
        weight = torch.sigmoid(self.mlp(torch.stack([avg, peak], dim=1)).sum(dim=1))  # B×2×C: one MLP call
        return x * weight.reshape(B, C, 1, 1)


class SpatialAttention(nn.Module):
    """A 7×7 convolution over the channel-wise mean and max maps, through a sigmoid, scales each pixel.
    B×C×H×W -> B×C×H×W.

    Args:
        kernel_size: odd. Default 7.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


class CBAM(nn.Sequential):
    """Convolutional Block Attention Module: ``ChannelAttention`` then ``SpatialAttention``.

    B×C×H×W -> B×C×H×W.

    Args:
        channels: C.
        reduction: channel-MLP reduction. Default 8.
        kernel_size: spatial-attention kernel. Default 7.

    Examples::

        >>> CBAM(16)(torch.zeros(2, 16, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7):
        super().__init__(ChannelAttention(channels, reduction), SpatialAttention(kernel_size))
