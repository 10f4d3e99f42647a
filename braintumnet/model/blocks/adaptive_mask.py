"""The adaptive mask generator of the Adaptive Masked Transformer (§2.2 and the Discussion)."""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveMaskGenerator(nn.Module):
    """A lightweight MLP that scores each patch token's importance for each head: a soft mask in (0, 1).

    The paper's generator is "jointly optimized using low-level and high-level semantic features": each token
    (local content) is scored together with the mean of all tokens (global context of the image).
    ``AdaptiveMaskedAttention`` adds ``log(mask)`` to the attention logits over keys, so a key with mask ``m``
    weighs ``m`` times its dense weight before renormalisation; at inference it may keep only the top-k keys.

    B×N×C -> B×heads×N, values in (0, 1).

    Args:
        dim: C, the token width.
        num_heads: one mask per head.
        hidden_ratio: hidden width as a fraction of ``2 * dim``. Default 0.25.
        act_layer: default ``nn.GELU``.

    Examples::

        >>> mask = AdaptiveMaskGenerator(64, num_heads=4)(torch.zeros(2, 16, 64))
        >>> mask.shape
        torch.Size([2, 4, 16])
    """

    def __init__(self, dim: int, num_heads: int, hidden_ratio: float = 0.25, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        hidden = max(int(2 * dim * hidden_ratio), num_heads)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), act_layer(), nn.Linear(hidden, num_heads))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Importance logits, B×N×C -> B×heads×N; ``sigmoid`` of these is the mask."""
        B, N, C = x.shape
        context = x.mean(dim=1, keepdim=True).expand(B, N, C)
        return self.mlp(torch.cat([x, context], dim=-1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scores(x))
