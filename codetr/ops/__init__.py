"""codetr's operators: compiled CPU/CUDA kernels (codetr._C) with pure-PyTorch references.

`extension_info()` says which path each op takes; `CODETR_OPS=auto|compiled|reference`
(or `set_ops_mode`) forces one.
"""
from ._extension import extension_info, get_ops_mode, set_ops_mode
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .multiscale_roi_align import MultiScaleRoIAlign, map_roi_levels, multiscale_roi_align
from .roi_align import roi_align, roi_align_reference

__all__ = [
    "extension_info",
    "get_ops_mode",
    "set_ops_mode",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "roi_align",
    "roi_align_reference",
    "MultiScaleRoIAlign",
    "map_roi_levels",
    "multiscale_roi_align",
]
