"""BrainTumNet: the paper's multi-task segmentation and classification network (§2.2, Figure 2)."""

from __future__ import annotations

from functools import partial
from typing import Iterator, NamedTuple

import torch
from torch import nn

from braintumnet.labels import REGIONS
from braintumnet.model.blocks.attention import AdaptiveMaskedAttention
from braintumnet.model.blocks.bt_block import BTBlock
from braintumnet.model.blocks.cbam import CBAM
from braintumnet.model.blocks.conv import NORM_GROUPS, ConvNormAct
from braintumnet.model.blocks.decoder_stage import DecoderStage
from braintumnet.model.blocks.gated_pooling import GatedPooling, GradientScale
from braintumnet.model.blocks.multikernel_conv import EncoderStage, MultiKernelConv
from braintumnet.model.blocks.pyramid import PyramidFusion
from braintumnet.model.blocks.t_inception import TInceptionBlock
from braintumnet.model.blocks.t_inceptionnet import TInceptionNet

# Segmentation labels whose softmax probabilities, summed, gate the classifier (the paper's Table 2 regions).
GATE_LABELS = REGIONS
MODES = ("multitask", "two-stage")
NUM_CLASSES = (2, 3)  # glioma/metastasis, or glioma/metastasis/meningioma
DOWNSAMPLINGS = 4  # the input side must be a multiple of 2**4


class BrainTumNetOutput(NamedTuple):
    """``seg_logits``: B×seg_classes×H×W; ``cls_logits``: B×num_classes. Logits: softmax is the loss's job."""

    seg_logits: torch.Tensor
    cls_logits: torch.Tensor


class Detach(GradientScale):
    """Stops the gradient: in two-stage mode the classification loss must not train the segmenter."""

    def __init__(self):
        super().__init__(0.0)


class BrainTumNet(nn.Module):
    """BrainTumNet (§2.2 and the Discussion): a segmenter whose soft tumour mask gates a classifier.

    Segmentation: a convolutional encoder of multi-kernel stages (widths f, 2f, 4f, 8f, 8f at 1, 1/2 ... 1/16 of
    the input; the bottleneck keeps 8f, which quarters its parameters, the bulk of what FedAvg sends each round),
    two ``BTBlock``\\ s (adaptive masked attention, self-attention, MLP) at the 1/16 bottleneck, and a
    symmetric decoder whose levels upsample, weight the skip connection with CBAM, fuse, and at 1/8 apply one more
    ``BTBlock``; a ``PyramidFusion`` of all four decoder levels gives the logits. Dense attention at 1/4 or finer
    would cost (H·W/16)² entries per head, which is what the paper's design avoids, so those levels are
    convolutional; the architecture (and its parameter count) does not depend on ``img_size``.

    Classification (T-InceptionNet): ``gate = Σ softmax(seg_logits)[region]``, with region ``tumor`` = {1},
    ``edema`` = {2} or ``whole`` = {1, 2}; the classifier sees ``cat(image · gate, gate)`` and nothing else, so the
    region really decides what it classifies from (the paper's Table 2). In ``multitask`` mode the classification
    loss also trains the segmenter through the gate; in ``two-stage`` mode the gate is detached and
    ``segmentation_parameters()`` / ``classification_parameters()`` split the model for training in turn.

    ``set_sparse_attention(True)`` makes the BT Blocks' global branch, in eval mode only, attend to the top
    ``topk_ratio`` of tokens ranked by the adaptive masks; training is always dense.

    Only GroupNorm and LayerNorm: no BatchNorm, so FedAvg and Opacus (DP-SGD) work unchanged.

    Ablation switches (the paper's component ablations; ``bench/accuracy.py`` trains them): ``use_transformer=False``
    replaces the three BT Blocks (the adaptive masked transformer) by ``nn.Identity``, ``use_inception=False`` the
    classifier's T-Inception blocks by one plain 3×3 ``ConvNormAct`` of the same width, ``use_cbam=False`` the
    decoder's CBAM skip weighting by ``nn.Identity``; ``gate_gradient=False`` detaches the gate in ``multitask`` mode
    too, so the two tasks train side by side and the classification loss no longer shapes the segmentation. The
    defaults are the full model, with its state-dict keys.

    Args:
        in_channels: image channels (CE-T1: 1). Default 1.
        seg_classes: segmentation classes, 0 background, 1 tumour, 2 edema. Default 3.
        num_classes: K, 3 (glioma/metastasis/meningioma) or 2 (glioma/metastasis). Default 3.
        img_size: the input side, a multiple of 16; recorded and checked, since ``forward`` takes any H and W
            that are multiples of 16 and the weights do not depend on it. Default 256.
        feature_size: f, the first encoder width, a multiple of 8. Default 32.
        num_heads: attention heads; ``4 * feature_size`` divisible by it. Default 4.
        window_size: local attention window side, in tokens. Default 4.
        topk_ratio: fraction of tokens kept as global keys by sparse inference, in (0, 1]. Default 0.5.
        gate_region: ``"tumor"``, ``"edema"`` or ``"whole"``. Default ``"tumor"``.
        mode: ``"multitask"`` or ``"two-stage"``. Default ``"multitask"``.
        dropout_rate: Dropout of the classification head, in [0, 1). Default 0.3.
        use_transformer: the BT Blocks at the bottleneck and at 1/8. Default True.
        use_inception: T-Inception blocks in the classifier (else plain 3×3 convolutions). Default True.
        use_cbam: CBAM on the skip connections (else the skips pass unweighted). Default True.
        gate_gradient: in ``multitask`` mode, let the classification loss train the segmenter through the gate
            (the paper's joint training). Default False: through the gate, the classification gradient collapsed
            segmentation on the phantom (docs/model-card.md); ``two-stage`` always detaches it.
        shared_features: the classifier head also receives the segmenter's bottleneck features pooled inside the
            gate and over the slice (``GatedPooling``). Default False.
        shared_gradient: the scale, in [0, 1], of the classification gradient into the shared encoder through those
            features (0 = none; two-stage forces 0). Default 1.0.
        gate_floor: the gate the classifier sees never drops below this, in [0, 1). Default 0.0.

    Raises:
        ValueError: naming the argument, for a size, width, class count, region or mode it cannot use.

    Examples::

        >>> model = BrainTumNet(img_size=64, feature_size=8, num_heads=2, num_classes=2, gate_region="whole")
        >>> out = model(torch.zeros(4, 1, 64, 64))
        >>> out.seg_logits.shape, out.cls_logits.shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 2]))
    """

    def __init__(
        self,
        in_channels: int = 1,
        seg_classes: int = 3,
        num_classes: int = 3,
        img_size: int = 256,
        feature_size: int = 32,
        num_heads: int = 4,
        window_size: int = 4,
        topk_ratio: float = 0.5,
        gate_region: str = "tumor",
        mode: str = "multitask",
        dropout_rate: float = 0.3,
        use_transformer: bool = True,
        use_inception: bool = True,
        use_cbam: bool = True,
        gate_gradient: bool = False,
        shared_features: bool = False,
        shared_gradient: float = 1.0,
        gate_floor: float = 0.0,
    ):
        super().__init__()
        _check_args(**locals())
        self.img_size, self.mode, self.gate_region = img_size, mode, gate_region
        self.gate_labels = list(GATE_LABELS[gate_region])
        f = feature_size
        bt_block = (partial(BTBlock, num_heads=num_heads, window_size=window_size, topk_ratio=topk_ratio)
                    if use_transformer else nn.Identity)
        decoder_stage = partial(DecoderStage, skip_layer=CBAM if use_cbam else nn.Identity)

        self.enc1 = MultiKernelConv(in_channels, f)
        self.enc2 = EncoderStage(f, 2 * f)
        self.enc3 = EncoderStage(2 * f, 4 * f)
        self.enc4 = EncoderStage(4 * f, 8 * f)
        self.bottleneck = nn.Sequential(EncoderStage(8 * f, 8 * f), bt_block(8 * f), bt_block(8 * f))
        self.dec4 = decoder_stage(8 * f, 8 * f, 8 * f, transformer=bt_block(8 * f))
        self.dec3 = decoder_stage(8 * f, 4 * f, 4 * f)
        self.dec2 = decoder_stage(4 * f, 2 * f, 2 * f)
        self.dec1 = decoder_stage(2 * f, f, f)
        self.pyramid = PyramidFusion([f, 2 * f, 4 * f, 8 * f], f, seg_classes)

        self.gate_grad = Detach() if mode == "two-stage" or not gate_gradient else nn.Identity()
        self.gate_floor = gate_floor
        # Shared features: the classification loss trains the shared encoder through them, scaled by
        # shared_gradient; two-stage training never lets it (identical network, segmentation trained first).
        self.shared_pool = GatedPooling() if shared_features else None
        self.shared_grad = GradientScale(0.0 if mode == "two-stage" else shared_gradient)
        self.classifier = TInceptionNet(in_channels + 1, num_classes, f, num_heads, dropout_rate,
                                        block_layer=TInceptionBlock if use_inception else ConvNormAct,
                                        extra_features=16 * f if shared_features else 0)

    def forward_segmentation(self, x: torch.Tensor) -> torch.Tensor:
        """B×C_in×H×W -> B×seg_classes×H×W logits."""
        return self._segment(x)[0]

    def _segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B×C_in×H×W -> (B×seg_classes×H×W logits, B×8f×H/16×W/16 bottleneck features)."""
        enc1 = self.enc1(x)
        enc2 = self.enc2(enc1)
        enc3 = self.enc3(enc2)
        enc4 = self.enc4(enc3)
        bottleneck = self.bottleneck(enc4)
        dec4 = self.dec4(bottleneck, enc4)
        dec3 = self.dec3(dec4, enc3)
        dec2 = self.dec2(dec3, enc2)
        dec1 = self.dec1(dec2, enc1)
        return self.pyramid([dec1, dec2, dec3, dec4]), bottleneck

    def gate(self, seg_logits: torch.Tensor) -> torch.Tensor:
        """The soft region mask, B×seg_classes×H×W -> B×1×H×W in (0, 1)."""
        return seg_logits.softmax(dim=1)[:, self.gate_labels].sum(dim=1, keepdim=True)

    def forward_classification(self, x: torch.Tensor, seg_logits: torch.Tensor,
                               bottleneck: torch.Tensor | None = None) -> torch.Tensor:
        """Image B×C_in×H×W, its seg_logits and (with ``shared_features``) the B×8f×h×w bottleneck
        -> B×num_classes logits."""
        gate = self.gate_grad(self.gate(seg_logits))
        if self.gate_floor > 0:  # the classifier still sees the slice, dimmed, where the segmenter finds nothing
            gate = self.gate_floor + (1.0 - self.gate_floor) * gate
        extra = None
        if self.shared_pool is not None:
            if bottleneck is None:
                raise ValueError("shared_features=True: pass the bottleneck features (forward does)")
            extra = self.shared_pool(self.shared_grad(bottleneck), gate)
        return self.classifier(torch.cat([x * gate, gate], dim=1), extra)

    def forward(self, x: torch.Tensor) -> BrainTumNetOutput:
        B, C, H, W = x.shape
        if H % 2**DOWNSAMPLINGS or W % 2**DOWNSAMPLINGS:
            raise ValueError(f"input of {H}×{W} pixels: both sides must be multiples of {2**DOWNSAMPLINGS}")
        seg_logits, bottleneck = self._segment(x)
        return BrainTumNetOutput(seg_logits, self.forward_classification(x, seg_logits, bottleneck))

    def segmentation_parameters(self) -> Iterator[nn.Parameter]:
        """Everything but the classifier: what stage one of two-stage training optimises."""
        return (p for name, p in self.named_parameters() if not name.startswith("classifier."))

    def classification_parameters(self) -> Iterator[nn.Parameter]:
        """The T-InceptionNet classifier: what stage two optimises, with the segmenter frozen."""
        return self.classifier.parameters()

    def set_sparse_attention(self, enabled: bool = True) -> BrainTumNet:
        """Top-k sparse global attention at inference (eval mode) when ``enabled``; dense otherwise."""
        for module in self.modules():
            if isinstance(module, AdaptiveMaskedAttention):
                module.sparse_inference = enabled
        return self


def _check_args(
    in_channels: int,
    seg_classes: int,
    num_classes: int,
    img_size: int,
    feature_size: int,
    num_heads: int,
    window_size: int,
    topk_ratio: float,
    gate_region: str,
    mode: str,
    dropout_rate: float,
    shared_gradient: float,
    gate_floor: float,
    **_: object,
) -> None:
    side = 2**DOWNSAMPLINGS
    if in_channels < 1:
        raise ValueError(f"in_channels={in_channels}: use at least 1")
    if img_size < side or img_size % side:
        raise ValueError(f"img_size={img_size}: use a multiple of {side} ({DOWNSAMPLINGS} downsamplings)")
    if feature_size < NORM_GROUPS or feature_size % NORM_GROUPS:
        raise ValueError(f"feature_size={feature_size}: use a multiple of {NORM_GROUPS} (GroupNorm groups)")
    if num_heads < 1 or 4 * feature_size % num_heads:
        raise ValueError(f"num_heads={num_heads}: 4 * feature_size = {4 * feature_size} must be divisible by it")
    if window_size < 1:
        raise ValueError(f"window_size={window_size}: use at least 1")
    if not 0.0 < topk_ratio <= 1.0:
        raise ValueError(f"topk_ratio={topk_ratio}: use a value in (0, 1]")
    if num_classes not in NUM_CLASSES:
        raise ValueError(f"num_classes={num_classes}: use one of {NUM_CLASSES}")
    if gate_region not in GATE_LABELS:
        raise ValueError(f"gate_region={gate_region!r}: use one of {tuple(GATE_LABELS)}")
    if seg_classes < 2 or max(GATE_LABELS[gate_region]) >= seg_classes:
        labels = GATE_LABELS[gate_region]
        raise ValueError(f"seg_classes={seg_classes}: gate_region={gate_region!r} needs labels {labels}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate}: use a value in [0, 1)")
    if not 0.0 <= shared_gradient <= 1.0:
        raise ValueError(f"shared_gradient={shared_gradient}: use a value in [0, 1]")
    if not 0.0 <= gate_floor < 1.0:
        raise ValueError(f"gate_floor={gate_floor}: use a value in [0, 1)")
