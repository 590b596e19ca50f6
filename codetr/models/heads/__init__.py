"""Co-DETR's auxiliary one-to-many heads, one file each, keyed by name (see common.py for
the contract every head follows)."""
from __future__ import annotations

import importlib

from .common import DEFAULT_STRIDES, AuxPositives

#: name -> module defining ``HEAD`` (the head class).
AUX_HEADS = {"atss": "atss", "rcnn": "rcnn", "retina": "retina", "fcos": "fcos"}


def build_aux_head(name: str, num_classes: int, in_channels: int = 256, strides=DEFAULT_STRIDES, **kwargs):
    """The auxiliary head called ``name`` (one of AUX_HEADS)."""
    if name not in AUX_HEADS:
        raise ValueError(f"aux_heads: unknown head {name!r}; expected one of {sorted(AUX_HEADS)}")
    module = importlib.import_module(f".{AUX_HEADS[name]}", __name__)
    return module.HEAD(num_classes, in_channels=in_channels, strides=tuple(strides), **kwargs)


__all__ = ["AUX_HEADS", "AuxPositives", "DEFAULT_STRIDES", "build_aux_head"]
