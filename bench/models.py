"""The networks the benchmarks compare, built at one width and input size, all answering BrainTumNet's output.

* BrainTumNet at a profile's width, and its ablations (``use_transformer`` / ``use_inception`` / ``use_cbam``);
* segmentation baselines from MONAI: ``BasicUNet`` (U-Net), ``DynUNet`` configured as nnU-Net plans a 2-D network
  (3×3 kernels, one stride-2 level per halving while the map stays at least 4 px, at most 6; filters doubling from
  the width, capped at 16× it, i.e. 32 ... 512 at the paper's width), and ``SwinUNETR`` in 2-D (the Swin-UNet
  analogue) at the ``feature_size`` values (multiples of 12) whose parameter counts bracket BrainTumNet's;
* classification baselines from MONAI: ``DenseNet121``, ``resnet18``, ``resnet50`` on the whole slice.

Every baseline is wrapped to return ``BrainTumNetOutput`` (constant zero logits for the task it does not do), so
the project's own ``train_model`` / ``evaluate_cases`` train and score it: the same data, augmentation, optimiser,
schedule and metrics as BrainTumNet. The constant logits carry no gradient, so a segmenter learns from MONAI's
``DiceCELoss`` alone and a classifier from the cross-entropy alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from braintumnet.config import PROFILES
from braintumnet.model import BrainTumNet
from braintumnet.model.braintumnet import BrainTumNetOutput

SWIN_STEP = 12  # SwinUNETR's feature_size must be divisible by 12 (its heads are 3, 6, 12, 24)


class SegOnly(nn.Module):
    """A segmentation network as a BrainTumNet: B×1×H×W -> (its B×3×H×W logits, zeros B×K)."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net, self.num_classes = net, num_classes

    def forward(self, x: torch.Tensor) -> BrainTumNetOutput:
        seg = self.net(x)
        return BrainTumNetOutput(seg, seg.new_zeros(x.shape[0], self.num_classes))


class ClsOnly(nn.Module):
    """A classifier as a BrainTumNet: B×1×H×W -> (zeros B×seg_classes×H×W, its B×K logits)."""

    def __init__(self, net: nn.Module, seg_classes: int = 3):
        super().__init__()
        self.net, self.seg_classes = net, seg_classes

    def forward(self, x: torch.Tensor) -> BrainTumNetOutput:
        B, _, H, W = x.shape
        cls = self.net(x)
        return BrainTumNetOutput(cls.new_zeros(B, self.seg_classes, H, W), cls)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def width_settings(width: str) -> dict:
    """``feature_size``, ``num_heads`` and ``img_size`` of a profile (``quick``, ``standard``, ``paper``)."""
    p = PROFILES[width]
    return {"feature_size": p.model.feature_size, "num_heads": p.model.num_heads, "img_size": p.data.img_size}


def braintumnet(feature_size: int, num_heads: int, img_size: int, num_classes: int = 3, **switches) -> BrainTumNet:
    p = PROFILES["paper"].model
    return BrainTumNet(in_channels=1, seg_classes=3, num_classes=num_classes, img_size=img_size,
                       feature_size=feature_size, num_heads=num_heads, window_size=p.window_size,
                       topk_ratio=p.topk_ratio, gate_region=p.gate_region, dropout_rate=p.dropout_rate, **switches)


def nnunet_levels(img_size: int) -> int:
    """Stride-2 levels nnU-Net's planner gives a square 2-D input: halve while the map stays >= 4 px, at most 6."""
    levels, side = 0, img_size
    while levels < 6 and side % 2 == 0 and side // 2 >= 4:
        side //= 2
        levels += 1
    return levels


def basic_unet(feature_size: int, num_classes: int = 3) -> SegOnly:
    from monai.networks.nets import BasicUNet

    scale = feature_size / 32  # MONAI's default features (32, 32, 64, 128, 256, 32) at the paper's width
    features = tuple(max(4, int(round(c * scale))) for c in (32, 32, 64, 128, 256, 32))
    return SegOnly(BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=features), num_classes)


def dyn_unet(feature_size: int, img_size: int, num_classes: int = 3) -> SegOnly:
    from monai.networks.nets import DynUNet

    levels = nnunet_levels(img_size)
    filters = [min(feature_size * 2**i, 16 * feature_size) for i in range(levels + 1)]
    net = DynUNet(2, 1, 3, kernel_size=[3] * (levels + 1), strides=[1] + [2] * levels,
                  upsample_kernel_size=[2] * levels, filters=filters, norm_name=("INSTANCE", {"affine": True}))
    return SegOnly(net, num_classes)


def swin_available() -> str | None:
    """None if SwinUNETR can run here, else why not (MONAI's SwinUNETR needs the optional ``einops``)."""
    try:
        import einops  # noqa: F401
    except ImportError:
        return "SwinUNETR needs the optional package einops, which is not installed (pip install einops)"
    return None


def swin_unetr(swin_feature_size: int, num_classes: int = 3) -> SegOnly:
    from monai.networks.nets import SwinUNETR

    return SegOnly(SwinUNETR(spatial_dims=2, in_channels=1, out_channels=3, feature_size=swin_feature_size),
                   num_classes)


def swin_sizes_bracketing(target_params: int, largest: int = 96) -> list[int]:
    """SwinUNETR feature sizes whose parameter counts bracket ``target_params``: the largest below and the
    smallest above (only the smallest, 12, when even it is above)."""
    below, above = None, None
    for fs in range(SWIN_STEP, largest + 1, SWIN_STEP):
        n = params(swin_unetr(fs).net)
        if n <= target_params:
            below = fs
        else:
            above = fs
            break
    return [fs for fs in (below, above) if fs is not None]


def segmentation_baselines(feature_size: int, img_size: int, num_classes: int = 3,
                           target_params: int | None = None) -> dict[str, Callable[[], nn.Module]]:
    """name -> factory, at BrainTumNet's width and input size."""
    found: dict[str, Callable[[], nn.Module]] = {
        "BasicUNet": lambda: basic_unet(feature_size, num_classes),
        "DynUNet (nnU-Net)": lambda: dyn_unet(feature_size, img_size, num_classes),
    }
    # SwinUNETR downsamples 32×; below 64 px its deepest InstanceNorm sees a 1×1 map and fails in training.
    if swin_available() is None and img_size % 32 == 0 and img_size >= 64:
        sizes = swin_sizes_bracketing(target_params) if target_params else [SWIN_STEP * max(1, feature_size // 8)]
        for fs in sizes:
            found[f"SwinUNETR fs{fs}"] = lambda fs=fs: swin_unetr(fs, num_classes)
    return found


# He et al.'s ResNet stem: a 7×7 convolution with stride 2, then max-pooling (as in torchvision, and as MONAI's
# DenseNet121 has). MONAI's ResNets default to stride 1 there, for small 3-D volumes: four times the pixels through
# every stage, which made ResNet-50 4.7× slower per training step at 64 px on this CPU (ResNet-18 2.7×).
RESNET_STEM_STRIDE = 2


def classifier_baselines(num_classes: int = 3) -> dict[str, Callable[[], nn.Module]]:
    from monai.networks.nets import DenseNet121, resnet18, resnet50

    resnet = {"spatial_dims": 2, "n_input_channels": 1, "num_classes": num_classes,
              "conv1_t_stride": RESNET_STEM_STRIDE}
    return {
        "DenseNet121": lambda: ClsOnly(DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)),
        "ResNet-18": lambda: ClsOnly(resnet18(**resnet)),
        "ResNet-50": lambda: ClsOnly(resnet50(**resnet)),
    }
