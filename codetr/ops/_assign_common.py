"""Helpers shared by the assigner references (atss_assign, max_iou_assign)."""
from __future__ import annotations

import torch

# mmdetection's bbox_overlaps clamps the union at this value: degenerate pairs get IoU 0,
# not NaN. The compiled kernels (csrc/assign/assign_kernel.h) use the same constant.
IOU_EPS = 1e-6


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 boxes, float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def iou_matrix(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """mmdetection's bbox_overlaps (mode "iou", eps 1e-6): [N, 4] x [M, 4] xyxy -> [N, M].

    Written op for op like mmdetection so that the compiled kernels, which evaluate the same
    expression in the same order, agree with it bit for bit:
    union = max((area1 + area2) - overlap, eps), IoU = overlap / union.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - overlap
    union = torch.max(union, union.new_tensor([IOU_EPS]))
    return overlap / union


def check_gts(op: str, gt_boxes: torch.Tensor, gt_counts: torch.Tensor, device: torch.device):
    """Argument checks of the references, with the compiled kernels' messages."""
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise RuntimeError(f"{op}: gt_boxes must be [B, G, 4], got shape {tuple(gt_boxes.shape)}")
    if not gt_boxes.is_floating_point():
        raise RuntimeError(f"{op}: gt_boxes must be a floating-point tensor, got {gt_boxes.dtype}")
    if gt_counts.dim() != 1 or gt_counts.shape[0] != gt_boxes.shape[0]:
        raise RuntimeError(
            f"{op}: gt_counts must be [B] with B = {gt_boxes.shape[0]}, got shape "
            f"{tuple(gt_counts.shape)}")
    if gt_counts.dtype != torch.int64:
        raise RuntimeError(f"{op}: gt_counts must have dtype torch.int64, got {gt_counts.dtype}")
    for name, t in (("gt_boxes", gt_boxes), ("gt_counts", gt_counts)):
        if t.device != device:
            raise RuntimeError(f"{op}: {name} must be on the same device as the boxes ({device}), "
                               f"got {t.device}")
    G = gt_boxes.shape[1]
    if gt_counts.numel() and bool(((gt_counts < 0) | (gt_counts > G)).any()):
        raise RuntimeError(f"{op}: gt_counts must lie in [0, G = {G}], got {gt_counts.tolist()}")
