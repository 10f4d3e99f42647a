"""One decoder level of BrainTumNet (§2.2): upsampling, a CBAM skip connection, fusion and an optional BT Block."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from braintumnet.model.blocks.cbam import CBAM
from braintumnet.model.blocks.conv import ConvNormAct, NormFactory, group_norm


class DecoderStage(nn.Module):
    """Upsample ×2 (a 1×1 convolution to C_out, then nearest-neighbour), concatenate the CBAM-weighted skip, fuse by
    a 3×3 convolution, then ``transformer`` (a ``BTBlock`` at the deep levels, ``nn.Identity`` elsewhere).

    Interpolation rather than a transposed convolution: Opacus has a per-sample-gradient hook for Conv2d but not for
    ConvTranspose2d. Nearest-neighbour, because the 3×3 fusion smooths anyway and its backward is a cheap sum.

    x: B×C_in×H/2×W/2, skip: B×C_skip×H×W -> B×C_out×H×W.

    Args:
        in_channels: C_in of the deeper level.
        skip_channels: C_skip of the encoder level.
        out_channels: C_out.
        transformer: applied after fusion. Default ``nn.Identity()``.
        norm_layer: default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.
        skip_layer: called with C_skip, weights the skip connection. Default ``CBAM``; ``nn.Identity`` passes it
            through unweighted (the ablation without CBAM).

    Examples::

        >>> stage = DecoderStage(32, 16, 16)
        >>> stage(torch.zeros(2, 32, 8, 8), torch.zeros(2, 16, 16, 16)).shape
        torch.Size([2, 16, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        transformer: nn.Module | None = None,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
        skip_layer: Callable[[int], nn.Module] = CBAM,
    ):
        super().__init__()
        self.up = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.skip_attn = skip_layer(skip_channels)
        self.fuse = ConvNormAct(out_channels + skip_channels, out_channels, 3, 1, 1, norm_layer, act_layer)
        self.transformer = transformer if transformer is not None else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # A 1×1 convolution commutes with interpolation: project first, at a quarter of the pixels.
        up = F.interpolate(self.up(x), size=skip.shape[-2:], mode="nearest")
        fused = self.fuse(torch.cat([up, self.skip_attn(skip)], dim=1))
        return self.transformer(fused)
