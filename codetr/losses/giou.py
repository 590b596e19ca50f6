"""Generalized IoU (Rezatofighi et al., 2019) in pure PyTorch.

Temporary: these will be replaced by ``codetr.ops.box_iou(mode="giou")`` and
``codetr.ops.generalized_box_iou_loss``, being written in parallel as compiled ops. Both
functions here have exactly torchvision's semantics (``torchvision.ops.generalized_box_iou``
and ``torchvision.ops.generalized_box_iou_loss``) so the swap is drop-in.
"""
from __future__ import annotations

import torch


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # As torchvision: integer boxes become float; float dtypes are kept (callers that need
    # fp32 under autocast cast before calling, as the matcher and criterion do).
    return t if t.is_floating_point() else t.float()


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of boxes1 [N, 4] and boxes2 [M, 4] (xyxy, x0 <= x1, y0 <= y1) -> [N, M]."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union
    lti = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rbi = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    whi = (rbi - lti).clamp(min=0)
    areai = whi[..., 0] * whi[..., 1]
    return iou - (areai - union) / areai


def generalized_box_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none",
                             eps: float = 1e-7) -> torch.Tensor:
    """Element-wise 1 - GIoU of matching rows of boxes1 [..., 4] and boxes2 [..., 4] (xyxy);
    reduction "none" | "mean" | "sum" ("mean" of an empty input is 0, as in torchvision)."""
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    intsctk = torch.zeros_like(x1)
    mask = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    loss = 1 - (iouk - ((area_c - unionk) / (area_c + eps)))
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    if reduction != "none":
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return loss
