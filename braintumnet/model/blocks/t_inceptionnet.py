"""T-InceptionNet, BrainTumNet's classification module (§2.2)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from braintumnet.model.blocks.conv import ConvNormAct, NormFactory, group_norm
from braintumnet.model.blocks.inception_transformer import InceptionTransformerBlock
from braintumnet.model.blocks.t_inception import TInceptionBlock


class TInceptionNet(nn.Module):
    """Classifies the tumour region that the segmentation gates.

    A stride-2 stem, three T-Inception stages (2×2 max pool, then a ``TInceptionBlock`` doubling the width), an
    ``InceptionTransformerBlock`` at 1/16 of the input size, and a head: global average and max pooling
    (concatenated, so that a small gated region is not diluted by the empty background), FC, activation, Dropout,
    FC. The head returns logits; softmax belongs to the loss and the metrics.

    B×C_in×H×W -> B×num_classes (H, W multiples of 16).

    Args:
        in_channels: C_in (BrainTumNet passes the gated image and the gate).
        num_classes: K.
        feature_size: stem width c; the stages have 2c, 4c, 8c. Default 32.
        num_heads: attention heads of the transformer stage; ``4c`` divisible by it. Default 4.
        dropout_rate: before the last FC. Default 0.3.
        norm_layer: default ``group_norm``.
        act_layer: default ``nn.LeakyReLU``.
        block_layer: the stages' block, called as ``block_layer(C_in, C_out, norm_layer=..., act_layer=...)``.
            Default ``TInceptionBlock``; ``ConvNormAct`` (one plain 3×3 convolution) is the ablation without the
            Inception module.
        extra_features: E, the width of a vector joined to the pooled features before the head (BrainTumNet's
            shared segmenter features, ``GatedPooling``); ``forward(x, extra)`` then takes it as B×E. Default 0.

    Examples::

        >>> TInceptionNet(2, num_classes=3, feature_size=8, num_heads=2)(torch.zeros(2, 2, 64, 64)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feature_size: int = 32,
        num_heads: int = 4,
        dropout_rate: float = 0.3,
        norm_layer: NormFactory = group_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
        block_layer: Callable[..., nn.Module] = TInceptionBlock,
        extra_features: int = 0,
    ):
        super().__init__()
        c = feature_size
        self.stem = ConvNormAct(in_channels, c, 3, stride=2, norm_layer=norm_layer, act_layer=act_layer)
        self.stages = nn.Sequential(
            *(
                nn.Sequential(
                    nn.MaxPool2d(2), block_layer(c_in, 2 * c_in, norm_layer=norm_layer, act_layer=act_layer)
                )
                for c_in in (c, 2 * c, 4 * c)
            )
        )
        self.transformer = InceptionTransformerBlock(8 * c, num_heads)
        self.avg_pool, self.max_pool = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * c + extra_features, 4 * c),
            act_layer(),
            nn.Dropout(dropout_rate),
            nn.Linear(4 * c, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B×C_in×H×W -> B×8c×H/16×W/16."""
        return self.transformer(self.stages(self.stem(x)))

    def forward_head(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """B×8c×h×w (and B×E when ``extra_features`` = E) -> B×num_classes logits."""
        pooled = torch.cat([self.avg_pool(features), self.max_pool(features)], dim=1).flatten(1)
        return self.head(pooled if extra is None else torch.cat([pooled, extra], dim=1))

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), extra)
