"""Detector building blocks."""
from .backbones import EfficientNetLite0, FrozenBatchNorm2d, ResNet50
from .deformable_detr import DeformableDETRPP
from .ms_deform_attn import MSDeformAttn
from .neck import ChannelMapper
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableDecoder, DeformableEncoder

__all__ = ["ChannelMapper", "DeformableDETRPP", "DeformableDecoder", "DeformableEncoder", "EfficientNetLite0",
           "FrozenBatchNorm2d", "MSDeformAttn", "PositionEmbeddingSine", "ResNet50"]
