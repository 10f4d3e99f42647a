"""The encoder's multi-kernel convolution and its stage (§2.2: "different-sized convolutional layers")."""

from __future__ import annotations

import torch
from torch import nn

from braintumnet.model.blocks.conv import ConvNormAct, NormFactory, group_norm


class MultiKernelConv(nn.Module):
    """Parallel 3×3 convolutions with dilations 1, 2, 3 (receptive fields 3, 5, 7), each normalised on its own and
    fused by summation, plus a shortcut: ``act(Σ_d norm_d(conv_d(x)) + shortcut(x))``.

    Dilated 3×3 kernels see what 3×3, 5×5 and 7×7 kernels see at a third and a fifth of the cost. A branch's own
    norm lets the block weigh the scales per sample (the branches would otherwise add up to one linear
    convolution); summing rather than concatenating and projecting saves a full-resolution 1×1 convolution. The
    shortcut is a 1×1 convolution when the width changes.

    B×C_in×H×W -> B×C_out×H×W.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        dilations: one branch per dilation. Default ``(1, 2, 3)``.
        norm_layer: called with C_out. Default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.

    Examples::

        >>> MultiKernelConv(1, 8)(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 8, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: tuple[int, ...] = (1, 2, 3),
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d, bias=False), norm_layer(out_channels)
            )
            for d in dilations
        )
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.shortcut(x)
        for branch in self.branches:
            fused = fused + branch(x)
        return self.act(fused)


class EncoderStage(nn.Sequential):
    """One encoder level: a stride-2 3×3 convolution halves the size, then a ``MultiKernelConv``.

    B×C_in×H×W -> B×C_out×H/2×W/2.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        norm_layer: default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer),
            MultiKernelConv(out_channels, out_channels, norm_layer=norm_layer, act_layer=act_layer),
        )
