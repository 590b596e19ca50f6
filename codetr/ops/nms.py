"""Non-maximum suppression with torchvision's semantics and output order
(torchvision.ops.nms and batched_nms): same kept indices, same order.

A box is suppressed when its IoU with a kept, higher-ranked box is > iou_threshold. Boxes
are ranked by a stable descending sort of the scores (equal scores: lower index first),
and the IoU is torchvision's arithmetic (no eps: a pair of zero-area boxes gives NaN, which
suppresses nothing). batched_nms suppresses only within a class; it runs per class (exact)
rather than on coordinate-offset boxes.

Order among equal scores in batched_nms: torchvision runs one nms on offset boxes for
inputs up to 1,000 boxes on CPU (25,000 on CUDA), which returns the stable order above;
for larger inputs it runs nms per class and re-sorts the kept indices (ascending) with
PyTorch's default, unstable descending sort. Both paths here reproduce that, so the
indices match torchvision exactly.

The compiled kernels live in csrc/box_ops/ (CPU: greedy scan per class; CUDA: bitmask
kernel, a one-block scan on the device, then one host sync to size the output).
"""
from __future__ import annotations

import torch

from . import _extension
from ._boxes import check_boxes, check_same_device, compute_dtype, kernel_boxes, kernel_pair
from ._checks import check, check_dim, check_dtype, sizes
from ._checks import check_same_device as kernel_same_device

OP_NMS = "nms"
OP_BATCHED = "batched_nms"
# boxes.numel() above which torchvision's batched_nms takes its per-class path.
_PER_CLASS_ABOVE = {"cpu": 4000, "cuda": 100_000}


def _check(op: str, boxes, scores, idxs=None) -> None:
    check_boxes(op, "boxes", boxes, "[K, 4]", dim=2)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{op}: scores must be [K] with K = {boxes.shape[0]} (rows of boxes), got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"{op}: scores must be a floating-point tensor, got {scores.dtype}")
    check_same_device(op, "boxes", boxes, "scores", scores)
    if idxs is not None:
        if not isinstance(idxs, torch.Tensor) or idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
            got = tuple(idxs.shape) if isinstance(idxs, torch.Tensor) else type(idxs).__name__
            raise ValueError(f"{op}: idxs must be [K] with K = {boxes.shape[0]} (rows of boxes), got {got}")
        if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
            raise TypeError(f"{op}: idxs must be an integer tensor (class of each box), got {idxs.dtype}")
        check_same_device(op, "boxes", boxes, "idxs", idxs)


def _greedy(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Kept indices of one class, by decreasing score (stable), torchvision's arithmetic."""
    order = torch.sort(scores, stable=True, descending=True).indices
    x1, y1, x2, y2 = boxes[order].unbind(1)
    area = (x2 - x1) * (y2 - y1)
    removed = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(order.shape[0]):
        if removed[i]:
            continue
        keep.append(i)
        w = (torch.min(x2[i], x2[i + 1 :]) - torch.max(x1[i], x1[i + 1 :])).clamp(min=0)
        h = (torch.min(y2[i], y2[i + 1 :]) - torch.max(y1[i], y1[i + 1 :])).clamp(min=0)
        inter = w * h
        ovr = inter / (area[i] + area[i + 1 :] - inter)
        # torchvision compares the IoU with the threshold in double precision.
        removed[i + 1 :] |= ovr.double() > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Pure-PyTorch NMS (a Python loop over the kept boxes; slow, the test oracle).

    Args:
        boxes: [K, 4] (x1, y1, x2, y2).
        scores: [K] floating point.
        iou_threshold: a box whose IoU with a kept, higher-scoring box is > this is removed.
    Returns:
        [K'] int64 indices of the kept boxes, by decreasing score; equal scores in index
        order (torchvision's stable sort). float16/bfloat16 inputs are computed in float32.
    """
    _check(OP_NMS, boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    dtype = compute_dtype(boxes, scores)
    return _greedy(boxes.detach().to(dtype), scores.detach().to(dtype), float(iou_threshold))


def batched_nms_reference(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Pure-PyTorch NMS within each class.

    Args:
        boxes: [K, 4]; scores: [K]; idxs: [K] integer class of each box.
        iou_threshold: as in `nms_reference`, applied within a class only.
    Returns:
        [K'] int64 kept indices by decreasing score, equal scores ordered as torchvision's
        batched_nms orders them (see the module docstring).
    """
    _check(OP_BATCHED, boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    dtype = compute_dtype(boxes, scores)
    boxes, scores = boxes.detach().to(dtype), scores.detach().to(dtype)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for cls in torch.unique(idxs):
        members = torch.where(idxs == cls)[0]
        keep_mask[members[_greedy(boxes[members], scores[members], float(iou_threshold))]] = True
    keep = torch.where(keep_mask)[0]
    stable = boxes.numel() <= _PER_CLASS_ABOVE.get(boxes.device.type, 4000)
    return keep[scores[keep].sort(descending=True, stable=stable)[1]]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS; same contract as `nms_reference`, compiled kernel when available.

    Not differentiable (the output is indices). On CUDA the op synchronises once with the
    host, to learn how many boxes are kept.
    """
    _check(OP_NMS, boxes, scores)
    if not _extension.use_compiled(OP_NMS, boxes.device):
        return nms_reference(boxes, scores, iou_threshold)
    dtype = compute_dtype(boxes, scores)
    return torch.ops.codetr.nms(
        boxes.detach().to(dtype), scores.detach().to(dtype), float(iou_threshold)
    )


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class; same contract as `batched_nms_reference`, compiled kernel
    when available."""
    _check(OP_BATCHED, boxes, scores, idxs)
    if not _extension.use_compiled(OP_BATCHED, boxes.device):
        return batched_nms_reference(boxes, scores, idxs, iou_threshold)
    dtype = compute_dtype(boxes, scores)
    return torch.ops.codetr.batched_nms(
        boxes.detach().to(dtype), scores.detach().to(dtype), idxs.to(torch.long), float(iou_threshold)
    )


def _fake_keep(op: str, boxes, scores, idxs=None):
    # check_nms in csrc/box_ops/box_ops.h
    kernel_boxes(boxes, 2, op, "boxes", "[K, 4]")
    check_dim(scores, 1, op, "scores", "[K]")
    kernel_pair(boxes, scores, op, "boxes", "scores")
    K = boxes.shape[0]
    check(scores.shape[0] == K, op, lambda: f"scores must be [K] with K = {K} (rows of boxes), "
                                            f"got {sizes(scores.shape)}")
    if idxs is not None:
        check_dim(idxs, 1, op, "idxs", "[K]")
        kernel_same_device(boxes, idxs, op, "boxes", "idxs")
        check_dtype(idxs, torch.int64, op, "idxs")
        check(idxs.shape[0] == K, op, lambda: f"idxs must be [K] with K = {K} (rows of boxes), "
                                              f"got {sizes(idxs.shape)}")
    # The number of kept boxes depends on the data.
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


if _extension.declare(OP_NMS):

    @torch.library.register_fake("codetr::nms")
    def _(boxes, scores, iou_threshold):
        return _fake_keep(OP_NMS, boxes, scores)


if _extension.declare(OP_BATCHED):

    @torch.library.register_fake("codetr::batched_nms")
    def _(boxes, scores, idxs, iou_threshold):
        return _fake_keep(OP_BATCHED, boxes, scores, idxs)
