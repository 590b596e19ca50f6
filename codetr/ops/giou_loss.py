"""Generalized IoU loss of aligned box pairs (Rezatofighi et al. 2019), with torchvision's
values and gradients (torchvision.ops.generalized_box_iou_loss).

The compiled op fuses the per-pair forward into one kernel and has an analytic backward
op (csrc/box_ops/); this module holds the pure-PyTorch reference, the fake kernels and the
autograd registration. The reduction runs in PyTorch on the per-pair losses.
"""
from __future__ import annotations

import torch

from . import _extension
from ._boxes import check_boxes, check_same_device, compute_dtype, kernel_boxes, kernel_pair
from ._checks import check, sizes

OP = "generalized_box_iou_loss"
REDUCTIONS = ("none", "mean", "sum")


def _check(pred, target, reduction: str) -> None:
    check_boxes(OP, "pred", pred, "[..., 4]", min_dim=1)
    check_boxes(OP, "target", target, "[..., 4]", min_dim=1)
    check_same_device(OP, "pred", pred, "target", target)
    if target.shape != pred.shape:
        raise ValueError(
            f"{OP}: target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f'{OP}: reduction must be "none", "mean" or "sum", got {reduction!r}')


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        # torchvision: the mean of no pairs is 0 (not NaN), and still has a graph.
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def _per_pair_reference(pred: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    x1, y1, x2, y2 = pred.unbind(dim=-1)
    x1g, y1g, x2g, y2g = target.unbind(dim=-1)
    # Intersection where the boxes overlap strictly, else 0.
    xk1, yk1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xk2, yk2 = torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.zeros_like(x1)
    mask = (yk2 > yk1) & (xk2 > xk1)
    inter[mask] = (xk2[mask] - xk1[mask]) * (yk2[mask] - yk1[mask])
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    # Smallest enclosing box.
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    return 1 - (iou - (area_c - union) / (area_c + eps))


def generalized_box_iou_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "none",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Pure-PyTorch GIoU loss, torchvision's formula term by term.

    Args:
        pred: [..., 4] predicted boxes (x1, y1, x2, y2), absolute pixels ([K, 4] in the
            losses).
        target: boxes of the same shape, paired element by element with pred.
        reduction: "none" ([...] per pair), "mean" (0 for no pairs) or "sum".
        eps: added to the union and to the enclosing area before dividing.
    Returns:
        loss = 1 - GIoU, float32 (float64 if an input is float64; float16/bfloat16 and
        integer boxes are computed in float32, also under autocast). Differentiable in
        pred and target.
    """
    _check(pred, target, reduction)
    dtype = compute_dtype(pred, target)
    return _reduce(_per_pair_reference(pred.to(dtype), target.to(dtype), eps), reduction)


def generalized_box_iou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "none",
    eps: float = 1e-7,
) -> torch.Tensor:
    """GIoU loss; same contract as `generalized_box_iou_loss_reference`.

    Runs the fused compiled kernel and its analytic backward when available (see
    `codetr.ops.extension_info()`), else the reference.
    """
    _check(pred, target, reduction)
    if not _extension.use_compiled(OP, pred.device):
        return generalized_box_iou_loss_reference(pred, target, reduction, eps)
    dtype = compute_dtype(pred, target)
    p = pred.to(dtype).reshape(-1, 4)
    t = target.to(dtype).reshape(-1, 4)
    loss = torch.ops.codetr.generalized_box_iou_loss(p, t, float(eps)).view(pred.shape[:-1])
    return _reduce(loss, reduction)


if _extension.declare(OP):

    @torch.library.register_fake("codetr::generalized_box_iou_loss")
    def _(pred, target, eps):
        # check_giou_loss in csrc/box_ops/box_ops.h
        kernel_boxes(pred, 2, OP, "pred", "[K, 4]")
        kernel_boxes(target, 2, OP, "target", "[K, 4]")
        kernel_pair(pred, target, OP, "pred", "target")
        check(target.shape[0] == pred.shape[0], OP,
              lambda: f"target must be [K, 4] with K = {pred.shape[0]} (rows of pred), got shape "
                      f"{sizes(target.shape)}")
        return pred.new_empty((pred.shape[0],))

    @torch.library.register_fake("codetr::generalized_box_iou_loss_backward")
    def _(grad, pred, target, eps):
        return pred.new_empty(pred.shape), target.new_empty(target.shape)

    def _setup_context(ctx, inputs, output):
        pred, target, eps = inputs
        ctx.save_for_backward(pred, target)
        ctx.eps = eps

    def _backward(ctx, grad):
        pred, target = ctx.saved_tensors
        grad_pred, grad_target = torch.ops.codetr.generalized_box_iou_loss_backward(
            grad, pred, target, ctx.eps
        )
        return grad_pred, grad_target, None

    torch.library.register_autograd(
        "codetr::generalized_box_iou_loss", _backward, setup_context=_setup_context
    )
