"""BrainTumNet's building blocks, one per file (§2.2)."""

from braintumnet.model.blocks.adaptive_mask import AdaptiveMaskGenerator
from braintumnet.model.blocks.attention import AdaptiveMaskedAttention, SelfAttention
from braintumnet.model.blocks.bt_block import BTBlock, Mlp
from braintumnet.model.blocks.cbam import CBAM, ChannelAttention, SpatialAttention
from braintumnet.model.blocks.conv import ConvNormAct, group_norm, layer_norm_2d
from braintumnet.model.blocks.decoder_stage import DecoderStage
from braintumnet.model.blocks.inception_transformer import InceptionMixer, InceptionTransformerBlock
from braintumnet.model.blocks.multikernel_conv import EncoderStage, MultiKernelConv
from braintumnet.model.blocks.pyramid import PyramidFusion
from braintumnet.model.blocks.t_inception import TInceptionBlock
from braintumnet.model.blocks.t_inceptionnet import TInceptionNet

__all__ = [
    "AdaptiveMaskGenerator",
    "AdaptiveMaskedAttention",
    "BTBlock",
    "CBAM",
    "ChannelAttention",
    "ConvNormAct",
    "DecoderStage",
    "EncoderStage",
    "group_norm",
    "layer_norm_2d",
    "InceptionMixer",
    "InceptionTransformerBlock",
    "Mlp",
    "MultiKernelConv",
    "PyramidFusion",
    "SelfAttention",
    "SpatialAttention",
    "TInceptionBlock",
    "TInceptionNet",
]
