"""Shared convolution helpers: the normalisation factories and ``ConvNormAct``.

BrainTumNet uses GroupNorm, never BatchNorm: FedAvg across non-IID hospitals and Opacus's per-sample gradients both
need statistics that belong to one sample, not to a batch (BatchNorm buffers averaged across sites and Opacus's
missing BatchNorm support are known problems in federated MRI). The factories return a
plain ``nn.GroupNorm``: Opacus picks its per-sample-gradient hook by exact type, so a subclass would silently fall
back to its slower functorch path.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

NORM_GROUPS = 8
NormFactory = Callable[[int], nn.Module]


def group_norm(num_channels: int) -> nn.GroupNorm:
    """``nn.GroupNorm`` with 8 groups, the norm of every convolution. ``num_channels`` must be a multiple of 8."""
    return nn.GroupNorm(NORM_GROUPS, num_channels)


def layer_norm_2d(num_channels: int) -> nn.GroupNorm:
    """``nn.GroupNorm`` with one group: a LayerNorm over C×H×W for B×C×H×W maps (PoolFormer's choice)."""
    return nn.GroupNorm(1, num_channels)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> activation, with "same" padding.

    B×C_in×H×W -> B×C_out×(H/stride)×(W/stride).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: an int or ``(kh, kw)``; padding keeps the size (odd kernels). Default 3.
        stride: default 1.
        dilation: default 1.
        norm_layer: called with C_out. Default ``group_norm``.
        act_layer: a type called with no argument. Default ``nn.LeakyReLU``.

    Examples::

        >>> import torch
        >>> ConvNormAct(1, 8, stride=2)(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        dilation: int = 1,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, dilation, bias=False),
            norm_layer(out_channels),
            act_layer(),
        )
