"""The encoder's multi-kernel convolution and its stage (§2.2: "different-sized convolutional layers")."""

from __future__ import annotations

import torch
from torch import nn

from braintumnet.model.blocks.conv import ConvNormAct, GroupNorm8


class MultiKernelConv(nn.Module):
    """Parallel 3×3 convolutions with dilations 1, 2, 3 (receptive fields 3, 5, 7), fused by a 1×1 convolution.

    Dilated 3×3 kernels see what 3×3, 5×5 and 7×7 kernels see at a third and a fifth of the cost. The block is
    residual: ``act(norm(fuse(cat(branches(x)))) + shortcut(x))``, with a 1×1 shortcut when the width changes.

    B×C_in×H×W -> B×C_out×H×W.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        dilations: one branch per dilation. Default ``(1, 2, 3)``.
        norm_layer: default ``GroupNorm8``.
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
        norm_layer: type[nn.Module] = GroupNorm8,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d, bias=False) for d in dilations
        )
        self.fuse = nn.Conv2d(len(dilations) * out_channels, out_channels, 1, bias=False)
        self.norm = norm_layer(out_channels)
        self.act = act_layer()
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi_scale = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.act(self.norm(self.fuse(multi_scale)) + self.shortcut(x))


class EncoderStage(nn.Sequential):
    """One encoder level: a stride-2 3×3 convolution halves the size, then a ``MultiKernelConv``.

    B×C_in×H×W -> B×C_out×H/2×W/2.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        norm_layer: default ``GroupNorm8``.
        act_layer: default ``nn.LeakyReLU``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: type[nn.Module] = GroupNorm8,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer),
            MultiKernelConv(out_channels, out_channels, norm_layer=norm_layer, act_layer=act_layer),
        )
