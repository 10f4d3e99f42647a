"""The joint model's links between segmenter and classifier: a gradient scale and gate-weighted pooling."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GradientScale(nn.Module):
    """Identity forward; the backward pass multiplies the gradient by ``scale`` (0 = stop-gradient, 1 = identity).

    Why: the classification loss reaches the segmenter through two links, the soft tumour gate and the shared
    encoder features. At initialisation the 0.7·CE gradient through the gate is an order of magnitude above the
    segmentation loss's own per-pixel gradient and collapses segmentation on the phantom (docs/model-card.md); a scale
    lets each link be measured and set on its own.

    B×... -> B×... (unchanged).

    Args:
        scale: in [0, 1].

    Examples::

        >>> x = torch.ones(2, requires_grad=True)
        >>> GradientScale(0.1)(x).sum().backward()
        >>> x.grad
        tensor([0.1000, 0.1000])
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale={scale}: use a value in [0, 1]")
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        if self.scale == 0.0:
            return x.detach()
        return _ScaleGradient.apply(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class GatedPooling(nn.Module):
    """Pools shared segmenter features inside and outside the soft tumour gate (the classifier's shared features).

    The paper's classifier "extracts tumor region features from segmentation results" and credits its accuracy to
    "auxiliary classification branches and pre-trained encoders": here the T-InceptionNet head also receives the
    segmenter's bottleneck features averaged under the gate (what the tumour looks like to the shared encoder) and
    over the whole slice (its context). The gate is resized to the features' grid by average pooling.

    features B×C×h×w, gate B×1×H×W (H, W multiples of h, w) -> B×2C.

    Examples::

        >>> GatedPooling()(torch.ones(2, 8, 4, 4), torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, C, h, w = features.shape
        weight = F.adaptive_avg_pool2d(gate, (h, w))
        inside = (features * weight).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + self.eps)
        return torch.cat([inside, features.mean(dim=(2, 3))], dim=1)
