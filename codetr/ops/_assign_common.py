"""Helpers shared by the assigner references (atss_assign, max_iou_assign)."""
from __future__ import annotations

import torch

from ._checks import (check, check_dim, check_dtype, check_floating, check_same_device,
                      check_tensors, readable, sizes)

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


def check_gts(op: str, boxes: torch.Tensor, boxes_name: str, gt_boxes, gt_counts) -> None:
    """gt_boxes [B, G, 4] floating and gt_counts [B] int64 on the device of `boxes`: the
    kernels' check_gts (csrc/assign/assign.h), with their messages."""
    check_tensors(op, gt_boxes=gt_boxes, gt_counts=gt_counts)
    check_dim(gt_boxes, 3, op, "gt_boxes", "[B, G, 4]")
    check(gt_boxes.shape[2] == 4, op, lambda: f"gt_boxes must be [B, G, 4], got {sizes(gt_boxes.shape)}")
    check_floating(gt_boxes, op, "gt_boxes")
    check_dim(gt_counts, 1, op, "gt_counts", "[B]")
    B, G = gt_boxes.shape[0], gt_boxes.shape[1]
    check(gt_counts.shape[0] == B, op, lambda: f"gt_counts must be [B] with B = {B} (the batch of "
                                               f"gt_boxes), got {sizes(gt_counts.shape)}")
    check_dtype(gt_counts, torch.int64, op, "gt_counts")
    check_same_device(boxes, gt_boxes, op, boxes_name, "gt_boxes")
    check_same_device(boxes, gt_counts, op, boxes_name, "gt_counts")
    if readable(gt_counts):
        for b, c in enumerate(gt_counts.tolist()):
            check(0 <= c <= G, op, lambda: f"gt_counts must lie in [0, G = {G}], got "
                                           f"gt_counts[{b}] = {c}")
