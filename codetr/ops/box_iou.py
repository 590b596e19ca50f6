"""Pairwise and aligned IoU / IoF / GIoU of boxes (mmdetection's bbox_overlaps semantics).

Used by the assigners (IoU of anchors or proposals with the ground truth) and the
Hungarian matcher (GIoU cost). The compiled kernels live in csrc/box_ops/; this module holds
the pure-PyTorch reference, the fake kernels and the autograd registration.
"""
from __future__ import annotations

import math

import torch

from . import _extension
from ._boxes import check_boxes, check_same_device, compute_dtype, kernel_boxes, kernel_pair
from ._checks import check, sizes

OP = "box_iou"
MODES = ("iou", "iof", "giou")


def _check(boxes1, boxes2, mode: str, aligned: bool) -> None:
    check_boxes(OP, "boxes1", boxes1, "[..., N, 4]")
    check_boxes(OP, "boxes2", boxes2, "[..., M, 4]")
    check_same_device(OP, "boxes1", boxes1, "boxes2", boxes2)
    if mode not in MODES:
        raise ValueError(f'{OP}: mode must be "iou", "iof" or "giou", got {mode!r}')
    try:
        torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{OP}: the batch dimensions of boxes1 {tuple(boxes1.shape[:-2])} and boxes2 "
            f"{tuple(boxes2.shape[:-2])} must broadcast"
        ) from None
    if aligned and boxes1.shape[-2] != boxes2.shape[-2]:
        raise ValueError(
            f"{OP}: boxes2 must hold as many boxes as boxes1 when aligned=True "
            f"(N = {boxes1.shape[-2]}), got M = {boxes2.shape[-2]}"
        )


def box_iou_reference(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: str = "iou",
    aligned: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Pure-PyTorch box overlaps, mmdetection's bbox_overlaps formula.

    Args:
        boxes1: [..., N, 4] boxes (x1, y1, x2, y2), absolute pixels.
        boxes2: [..., M, 4]; the leading (batch) dimensions of boxes1 and boxes2 broadcast.
        mode: "iou" = inter / max(union, eps); "iof" = inter / max(area of boxes1, eps);
            "giou" = iou - (enclose - union) / enclose with enclose = max(area of the
            smallest enclosing box, eps). The eps clamps keep zero-area boxes finite.
        aligned: pair boxes1[..., i] with boxes2[..., i] only (needs N == M).
        eps: lower bound of the union (area of boxes1 for "iof") and of the enclosing area.
    Returns:
        [..., N, M] (or [..., N] when aligned), float32 (float64 if an input is float64;
        float16/bfloat16 and integer boxes are computed in float32). Differentiable.
    """
    _check(boxes1, boxes2, mode, aligned)
    dtype = compute_dtype(boxes1, boxes2)
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    if not aligned:  # [..., N, 1, 4] against [..., 1, M, 4]
        b1, b2 = b1[..., :, None, :], b2[..., None, :, :]
        area1, area2 = area1[..., :, None], area2[..., None, :]
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 if mode == "iof" else area1 + area2 - overlap
    eps_t = overlap.new_tensor(eps)
    union = torch.max(union, eps_t)
    ious = overlap / union
    if mode != "giou":
        return ious
    enclosed_wh = (torch.max(b1[..., 2:], b2[..., 2:]) - torch.min(b1[..., :2], b2[..., :2])).clamp(min=0)
    enclose_area = torch.max(enclosed_wh[..., 0] * enclosed_wh[..., 1], eps_t)
    return ious - (enclose_area - union) / enclose_area


def box_iou(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: str = "iou",
    aligned: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Box overlaps; same contract as `box_iou_reference`.

    Runs the compiled CPU/CUDA kernel when available (see `codetr.ops.extension_info()`),
    else the reference. Differentiable in boxes1 and boxes2 on both paths (the compiled
    op has an analytic backward op, `codetr::box_iou_backward`). Broadcast batch
    dimensions are expanded before the kernel (a copy only where an input is broadcast).
    """
    _check(boxes1, boxes2, mode, aligned)
    if not _extension.use_compiled(OP, boxes1.device):
        return box_iou_reference(boxes1, boxes2, mode, aligned, eps)
    dtype = compute_dtype(boxes1, boxes2)
    batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    N, M = boxes1.shape[-2], boxes2.shape[-2]
    B = math.prod(batch)
    b1 = boxes1.to(dtype).expand(*batch, N, 4).reshape(B, N, 4)
    b2 = boxes2.to(dtype).expand(*batch, M, 4).reshape(B, M, 4)
    out = torch.ops.codetr.box_iou(b1, b2, mode, aligned, float(eps))
    return out.view(*batch, N) if aligned else out.view(*batch, N, M)


if _extension.declare(OP):

    @torch.library.register_fake("codetr::box_iou")
    def _(boxes1, boxes2, mode, aligned, eps):
        # check_box_iou in csrc/box_ops/box_ops.h
        kernel_boxes(boxes1, 3, OP, "boxes1", "[B, N, 4]")
        kernel_boxes(boxes2, 3, OP, "boxes2", "[B, M, 4]")
        kernel_pair(boxes1, boxes2, OP, "boxes1", "boxes2")
        B, N, M = boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]
        check(boxes2.shape[0] == B, OP, lambda: f"boxes2 must be [B, M, 4] with B = {B} (batch of "
                                                f"boxes1), got shape {sizes(boxes2.shape)}")
        check(mode in MODES, OP, lambda: f'mode must be "iou", "iof" or "giou", got "{mode}"')
        check(not aligned or N == M, OP, lambda: f"boxes2 must hold as many boxes as boxes1 when "
                                                 f"aligned=True (N = {N}), got M = {M}")
        return boxes1.new_empty((B, N) if aligned else (B, N, M))

    @torch.library.register_fake("codetr::box_iou_backward")
    def _(grad, boxes1, boxes2, mode, aligned, eps):
        B, N, _ = boxes1.shape
        M = boxes2.shape[1]
        return boxes1.new_empty((B, N, 4)), boxes2.new_empty((B, M, 4))

    def _setup_context(ctx, inputs, output):
        boxes1, boxes2, mode, aligned, eps = inputs
        ctx.save_for_backward(boxes1, boxes2)
        ctx.args = (mode, aligned, eps)

    def _backward(ctx, grad):
        boxes1, boxes2 = ctx.saved_tensors
        grad1, grad2 = torch.ops.codetr.box_iou_backward(grad, boxes1, boxes2, *ctx.args)
        return grad1, grad2, None, None, None

    torch.library.register_autograd("codetr::box_iou", _backward, setup_context=_setup_context)
