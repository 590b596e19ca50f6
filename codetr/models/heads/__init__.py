"""Co-DETR's auxiliary one-to-many heads, one file each (atss, rcnn, retina, fcos); see
common.py for the contract every head follows and config.build_aux_head for construction."""
from .common import DEFAULT_STRIDES, AuxPositives

__all__ = ["AuxPositives", "DEFAULT_STRIDES"]
