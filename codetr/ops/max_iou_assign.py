"""Max-IoU assignment with mmdetection's MaxIoUAssigner semantics (RPN, R-CNN, RetinaNet),
batched over images whose gts are padded to a common G.

Each prior takes its largest IoU over the gts (max_iou) and the first gt reaching it:
  -1 (ignored) by default; 0 (negative) where neg_lo <= max_iou < neg_hi;
  k + 1 (gt k) where max_iou >= pos_iou_thr;
then, with match_low_quality, every gt whose own largest IoU over the priors is
>= min_pos_iou takes the prior(s) reaching it (all of them with gt_max_assign_all, else the
first), later gts overwriting earlier ones as in mmdetection's loop. max_iou is not changed
by that step. IoU is mmdetection's bbox_overlaps (union clamped at 1e-6) in the compute
dtype; thresholds are compared in that dtype, as mmdetection's tensor-vs-float comparisons
do; NaN IoUs propagate through the maxima as in torch.max (a NaN max_iou is neither
negative nor positive).

The compiled kernels live in csrc/assign/; they never build the [G, A] matrix below.
"""
from __future__ import annotations

import torch

from . import _extension
from ._assign_common import check_gts, compute_dtype, iou_matrix
from ._checks import check, check_floating, check_tensors, sizes

OP = "max_iou_assign"


def _max_iou_one_image(priors, gts, pos_iou_thr, neg_lo, neg_hi, min_pos_iou, match_low_quality,
                       gt_max_assign_all):
    """mmdetection's MaxIoUAssigner.assign_wrt_overlaps for one image."""
    G, A = gts.shape[0], priors.shape[0]
    assigned = torch.full((A,), -1, dtype=torch.long, device=priors.device)
    if G == 0 or A == 0:
        assigned[:] = 0
        return assigned, priors.new_zeros(A)
    overlaps = iou_matrix(gts, priors)  # [G, A]
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)

    assigned[(max_overlaps >= neg_lo) & (max_overlaps < neg_hi)] = 0
    pos = max_overlaps >= pos_iou_thr
    assigned[pos] = argmax_overlaps[pos] + 1

    if match_low_quality:
        # Low-quality matches: a gt may take a prior below pos_iou_thr (its best one).
        for i in range(G):
            if gt_max_overlaps[i] >= min_pos_iou:
                if gt_max_assign_all:
                    assigned[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
                else:
                    assigned[gt_argmax_overlaps[i]] = i + 1
    return assigned, max_overlaps


def _neg_range(neg_iou_thr) -> tuple[float, float]:
    """mmdetection: a float t means [0, t); a (lo, hi) tuple means [lo, hi)."""
    if isinstance(neg_iou_thr, (tuple, list)):
        if len(neg_iou_thr) != 2:
            raise ValueError(f"{OP}: neg_iou_thr must be a float or a (lo, hi) pair, "
                             f"got {neg_iou_thr!r}")
        return float(neg_iou_thr[0]), float(neg_iou_thr[1])
    return 0.0, float(neg_iou_thr)


def check_max_iou(priors, gt_boxes, gt_counts) -> None:
    """The kernels' checks (check_max_iou in csrc/assign/assign.h), with their messages."""
    check_tensors(OP, priors=priors)
    check(priors.dim() in (2, 3) and priors.shape[-1] == 4, OP,
          lambda: f"priors must be [A, 4] or [B, A, 4], got {sizes(priors.shape)}")
    check_floating(priors, OP, "priors")
    check_gts(OP, priors, "priors", gt_boxes, gt_counts)
    B = gt_boxes.shape[0]
    check(priors.dim() == 2 or priors.shape[0] == B, OP,
          lambda: f"priors must be [B, A, 4] with B = {B} (the batch of gt_boxes), got "
                  f"{sizes(priors.shape)}")


def max_iou_assign_reference(
    priors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image pure-PyTorch MaxIoUAssigner (mmdetection's, building the [G, A] matrix).

    Args:
        priors: [A, 4] shared by all images, or [B, A, 4]; xyxy absolute pixels.
        gt_boxes: [B, G, 4] xyxy; image b's gts are gt_boxes[b, :gt_counts[b]].
        gt_counts: [B] int64.
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all:
            mmdetection's MaxIoUAssigner arguments (neg_iou_thr a float t for [0, t), or a
            (lo, hi) pair for [lo, hi)).
    Returns:
        assigned [B, A] int64: -1 ignored, 0 negative, k + 1 gt k; every prior of an image
            without gts is 0.
        max_iou [B, A]: largest IoU over the image's gts (0 without gts); float32 (float64
            when a box input is float64).
    Half/bfloat16 boxes are computed in float32.
    """
    neg_lo, neg_hi = _neg_range(neg_iou_thr)
    check_max_iou(priors, gt_boxes, gt_counts)
    dtype = compute_dtype(priors, gt_boxes)
    priors = priors.to(dtype)
    gt_boxes = gt_boxes.to(dtype)
    A = priors.shape[-2]
    results = [
        _max_iou_one_image(priors if priors.dim() == 2 else priors[b], gt_boxes[b, :n],
                           pos_iou_thr, neg_lo, neg_hi, min_pos_iou, match_low_quality,
                           gt_max_assign_all)
        for b, n in enumerate(gt_counts.tolist())
    ]
    if not results:
        return priors.new_zeros((0, A), dtype=torch.long), priors.new_zeros((0, A))
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def max_iou_assign(
    priors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-IoU assignment; same contract as `max_iou_assign_reference`. Not differentiable.

    The compiled kernel computes the per-prior and per-gt maxima in one pass over the
    (prior, gt) pairs without storing them, and recomputes IoUs only in the blocks of priors
    that hold a gt's maximum for the low-quality step: memory O(B * (A + G * A / 256)).
    Presets: RPN (0.7, 0.3, min_pos_iou=0.3), R-CNN (0.5, 0.5, 0.5, match_low_quality per
    config), RetinaNet (0.5, 0.4, min_pos_iou=0).
    """
    neg_lo, neg_hi = _neg_range(neg_iou_thr)
    check_tensors(OP, priors=priors, gt_boxes=gt_boxes, gt_counts=gt_counts)
    if _extension.use_compiled(OP, priors.device):
        return torch.ops.codetr.max_iou_assign(
            priors, gt_boxes, gt_counts, float(pos_iou_thr), neg_lo, neg_hi, float(min_pos_iou),
            bool(match_low_quality), bool(gt_max_assign_all))
    return max_iou_assign_reference(priors, gt_boxes, gt_counts, pos_iou_thr, (neg_lo, neg_hi),
                                    min_pos_iou, match_low_quality, gt_max_assign_all)


if _extension.declare(OP):

    @torch.library.register_fake("codetr::max_iou_assign")
    def _(priors, gt_boxes, gt_counts, pos_iou_thr, neg_iou_lo, neg_iou_hi, min_pos_iou,
          match_low_quality, gt_max_assign_all):
        check_max_iou(priors, gt_boxes, gt_counts)
        B, A = gt_boxes.shape[0], priors.shape[-2]
        dtype = compute_dtype(priors, gt_boxes)
        return (priors.new_empty((B, A), dtype=torch.long),
                priors.new_empty((B, A), dtype=dtype))
