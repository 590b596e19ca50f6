"""Detector building blocks."""
from .backbones import EfficientNetLite0, FrozenBatchNorm2d, ResNet50
from .co_detr import CoDETR
from .deformable_detr import DeformableDETRPP, PositiveQueryEmbedding
from .detector import Memory
from .ms_deform_attn import MSDeformAttn
from .neck import ChannelMapper
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableDecoder, DeformableEncoder

__all__ = ["ChannelMapper", "CoDETR", "DeformableDETRPP", "DeformableDecoder", "DeformableEncoder", "EfficientNetLite0",
           "FrozenBatchNorm2d", "MSDeformAttn", "Memory", "PositionEmbeddingSine", "PositiveQueryEmbedding", "ResNet50"]
