"""codetr's operators: compiled CPU/CUDA kernels (codetr._C) with pure-PyTorch references.

`extension_info()` says which path each op takes; `CODETR_OPS=auto|compiled|reference`
(or `set_ops_mode`) forces one.
"""
from ._extension import extension_info, get_ops_mode, set_ops_mode
from .box_iou import box_iou, box_iou_reference
from .giou_loss import generalized_box_iou_loss, generalized_box_iou_loss_reference
from .atss_assign import atss_assign, atss_assign_reference
from .max_iou_assign import max_iou_assign, max_iou_assign_reference
from .ms_deform_attn import (
    ms_deform_attn, ms_deform_attn_reference,
)
from .nms import batched_nms, batched_nms_reference, nms, nms_reference
from .multiscale_roi_align import MultiScaleRoIAlign, map_roi_levels, multiscale_roi_align
from .roi_align import roi_align, roi_align_reference

__all__ = [
    "extension_info",
    "get_ops_mode",
    "set_ops_mode",
    "atss_assign",
    "atss_assign_reference",
    "max_iou_assign",
    "max_iou_assign_reference",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "box_iou",
    "box_iou_reference",
    "generalized_box_iou_loss",
    "generalized_box_iou_loss_reference",
    "nms",
    "nms_reference",
    "batched_nms",
    "batched_nms_reference",
    "roi_align",
    "roi_align_reference",
    "MultiScaleRoIAlign",
    "map_roi_levels",
    "multiscale_roi_align",
]
