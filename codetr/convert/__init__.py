"""Checkpoint converters: other implementations' state dicts to ours and back.

``official``: the Sense-X/Co-DETR Co-Deformable-DETR checkpoints (mmdetection 2.x layout).
Every key is mapped by name (never by position) or reported as dropped with its reason.
"""
from .official import ConversionReport, from_official, to_official

__all__ = ["ConversionReport", "from_official", "to_official"]
