"""The joint segmentation + classification loss of BrainTumNet (§2.1.4)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from monai.losses import DiceCELoss
from torch import nn

__all__ = ["LossOutput", "MultiTaskLoss", "class_log_prior"]


def class_log_prior(labels, num_classes: int) -> torch.Tensor:
    """(K,) log frequencies of ``labels`` (class indices), with one pseudo-count per class so that a class the data
    lack gets a finite, low prior instead of -inf."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long).reshape(-1), minlength=num_classes).float() + 1
    return torch.log(counts / counts.sum())


class LossOutput(NamedTuple):
    """The loss and its parts, so each can be logged: ``total = weight_seg * seg + weight_cls * cls``.

    ``seg`` and ``cls`` are the unweighted component losses (scalar tensors). A component whose weight is 0 is still
    reported, computed without gradient, and is left out of ``total``.
    """

    total: torch.Tensor
    seg: torch.Tensor
    cls: torch.Tensor


class MultiTaskLoss(nn.Module):
    """DiceCE for the segmentation plus cross-entropy for the tumour type, weighted 1.0 and 0.7 as in the paper.

    BrainTumNet (§2.1.4): "The weights for segmentation and classification losses were set to 1.0 and 0.7 [...] Dice
    Loss and DiceCELoss were selected as the loss functions." The segmentation term is MONAI's ``DiceCELoss`` with
    ``to_onehot_y=True, softmax=True`` over the label map (0 background, 1 tumour, 2 edema):

    * ``include_background=False``: the Dice part scores the tumour and edema channels only, as nnU-Net does for
      softmax outputs. Background fills most of a slice, so its Dice is near 1 from the first steps and only dilutes
      the signal of the small regions we are scored on; the cross-entropy part still covers every pixel, background
      included.
    * ``batch=True``: Dice is pooled over the whole batch before the ratio (nnU-Net's "batch Dice"). Many slices
      have no edema or only a sliver of tumour; a per-slice Dice of such a slice is dominated by the smoothing terms
      and is noisy, while the batch almost always holds some of every region.
    * ``lambda_ce`` (``train.seg-ce-weight``): the cross-entropy part averages over every pixel, and at 64 px the
      tumour is under 1 % of a training slice's pixels, so at full weight it pushes the whole slice towards
      background faster than the Dice part pulls the tumour out: from some initial weights the segmenter then
      predicted no tumour at all for the whole schedule (docs/model-card.md gives the measurement).
    * ``smooth_nr = smooth_dr = 1e-5`` (MONAI's default): small enough not to bias a region of a few hundred pixels,
      and it makes an empty prediction of a region absent from the batch a perfect 0 instead of 0/0.

    Args:
        weight_seg: weight of the segmentation term (DiceCE). Defaults to 1.0.
        weight_cls: weight of the classification term (cross-entropy). Defaults to 0.7.
        lambda_dice: weight of Dice within DiceCE. Defaults to 1.0.
        lambda_ce: weight of cross-entropy within DiceCE. Defaults to 1.0.
        include_background: whether the Dice part includes the background channel. Defaults to False.
        batch: whether Dice is pooled over the batch. Defaults to True.
        smooth_nr: Dice numerator smoothing. Defaults to 1e-5.
        smooth_dr: Dice denominator smoothing. Defaults to 1e-5.
        label_smoothing: label smoothing of the classification cross-entropy. Defaults to 0.0.
        class_log_prior: (K,) log class frequencies of the training data (``class_log_prior()``); used only with
            ``logit_adjustment`` > 0. Defaults to None.
        logit_adjustment: tau of the logit-adjusted cross-entropy (0 = plain cross-entropy). Defaults to 0.0.

    Raises:
        ValueError: naming a weight that is negative or not finite, or when both task weights are 0.

    Examples::

        >>> loss_fn = MultiTaskLoss(weight_seg=1.0, weight_cls=0.7)
        >>> out = loss_fn(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16)),
        ...               torch.randn(2, 3), torch.tensor([0, 2]))
        >>> out.total.shape, out.seg.shape, out.cls.shape
        (torch.Size([]), torch.Size([]), torch.Size([]))
    """

    def __init__(
        self,
        weight_seg: float = 1.0,
        weight_cls: float = 0.7,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = False,
        batch: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        label_smoothing: float = 0.0,
        class_log_prior: torch.Tensor | None = None,
        logit_adjustment: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("weight_seg", weight_seg), ("weight_cls", weight_cls)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if weight_seg == 0 and weight_cls == 0:
            raise ValueError(f"weight_seg and weight_cls cannot both be 0, got {weight_seg!r} and {weight_cls!r}")
        self.weight_seg = float(weight_seg)
        self.weight_cls = float(weight_cls)
        # DiceCELoss validates lambda_dice/lambda_ce (ValueError on a negative value) and the smoothing terms.
        self.seg_loss = DiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            batch=batch,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        self.cls_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        if not (math.isfinite(logit_adjustment) and logit_adjustment >= 0):
            raise ValueError(f"logit_adjustment must be a finite number >= 0, got {logit_adjustment!r}")
        # Logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"; per site as FedLC, Zhang et
        # al. 2022): the cross-entropy sees logits + tau * log(prior of the data being trained on), so the model's
        # own logits learn the class-balanced posterior. Each hospital's prior is different (referral patterns);
        # without this, each site's local epochs pull the classifier's biases toward its own majority type and the
        # averaged model's decision follows whichever site moved last. Inference uses the raw logits.
        offset = None
        if class_log_prior is not None and logit_adjustment > 0:
            offset = logit_adjustment * torch.as_tensor(class_log_prior, dtype=torch.float32).reshape(1, -1)
        self.register_buffer("cls_offset", offset, persistent=False)

    def forward(
        self,
        seg_logits: torch.Tensor,
        seg_target: torch.Tensor,
        cls_logits: torch.Tensor,
        cls_target: torch.Tensor,
    ) -> LossOutput:
        """
        Args:
            seg_logits: B×C×H×W segmentation logits (C = 3: background, tumour, edema).
            seg_target: B×H×W or B×1×H×W integer label map.
            cls_logits: B×K classification logits.
            cls_target: (B,) class indices.

        Returns:
            :class:`LossOutput` of scalar tensors, computed in float32 (safe under autocast).
        """
        B, C, H, W = seg_logits.shape
        if seg_target.dim() == 3:
            seg_target = seg_target.unsqueeze(1)
        if tuple(seg_target.shape) != (B, 1, H, W):
            raise ValueError(f"seg_target must be B×H×W or B×1×H×W = {B}×1×{H}×{W} for seg_logits "
                             f"{tuple(seg_logits.shape)}, got {tuple(seg_target.shape)}")
        if cls_logits.dim() != 2 or cls_logits.shape[0] != B or tuple(cls_target.shape) != (B,):
            raise ValueError(f"cls_logits must be B×K and cls_target (B,) with B = {B}, got "
                             f"{tuple(cls_logits.shape)} and {tuple(cls_target.shape)}")

        seg = self._component(self.weight_seg, self.seg_loss, seg_logits.float(), seg_target)
        cls_logits = cls_logits.float()
        if self.cls_offset is not None:
            if self.cls_offset.shape[1] != cls_logits.shape[1]:
                raise ValueError(f"class_log_prior has {self.cls_offset.shape[1]} classes, cls_logits "
                                 f"{cls_logits.shape[1]}")
            cls_logits = cls_logits + self.cls_offset.to(cls_logits.device)
        cls = self._component(self.weight_cls, self.cls_loss, cls_logits, cls_target.long())
        # A zero-weight term is left out rather than multiplied by 0, which would turn a NaN or inf into NaN.
        terms = [w * loss for w, loss in ((self.weight_seg, seg), (self.weight_cls, cls)) if w > 0]
        return LossOutput(total=torch.stack(terms).sum(), seg=seg, cls=cls)

    @staticmethod
    def _component(weight: float, loss_fn: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if weight > 0:
            return loss_fn(logits, target)
        with torch.no_grad():  # reported for logging only; no graph through a term that is switched off
            return loss_fn(logits, target)
