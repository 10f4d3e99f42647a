"""Shared convolution helpers: ``GroupNorm8`` (the only normalisation of the CNN parts) and ``ConvNormAct``.

BrainTumNet uses GroupNorm, never BatchNorm: FedAvg across non-IID hospitals and Opacus's per-sample gradients both
need statistics that belong to one sample, not to a batch (``../shared/notes/field.md``).
"""

from __future__ import annotations

from torch import nn

NORM_GROUPS = 8


class GroupNorm8(nn.GroupNorm):
    """``nn.GroupNorm`` with 8 groups, so it can be passed as a layer type taking only ``num_channels``.

    Args:
        num_channels: C, a multiple of 8.
    """

    def __init__(self, num_channels: int):
        super().__init__(NORM_GROUPS, num_channels)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> activation, with "same" padding.

    B×C_in×H×W -> B×C_out×(H/stride)×(W/stride).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: an int or ``(kh, kw)``; padding keeps the size (odd kernels). Default 3.
        stride: default 1.
        dilation: default 1.
        norm_layer: a type called with C_out. Default ``GroupNorm8``.
        act_layer: a type called with no argument. Default ``nn.LeakyReLU``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        dilation: int = 1,
        norm_layer: type[nn.Module] = GroupNorm8,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, dilation, bias=False),
            norm_layer(out_channels),
            act_layer(),
        )
