"""ATSS assignment (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection"), with mmdetection's
ATSSAssigner semantics, batched over images whose gts are padded to a common G.

For each gt, on each level, the min(topk, A_l) anchors whose centres are nearest to the gt
centre are candidates; the IoU threshold of the gt is the mean + unbiased std of its
candidates' IoUs; a candidate is positive when its IoU >= threshold and its centre lies
inside the gt by more than 0.01 on all four sides; an anchor positive for several gts goes
to the one of largest IoU.

Exact rules where mmdetection leaves them to torch (the compiled kernels and the reference
below both follow them):
- distances are mmdetection's sqrt((ax - gx)^2 + (ay - gy)^2) in the compute dtype; equal
  distances rank the lower anchor index first (torch.topk leaves that order unspecified);
  NaN distances rank after all numbers;
- IoU is mmdetection's bbox_overlaps (union clamped at 1e-6), in the compute dtype;
- the threshold's mean and std are accumulated in float64 (torch.std's own accumulation on
  CPU); a gt with a single candidate in all (one anchor in all) has a NaN std, hence a NaN
  threshold and no positive, as in mmdetection;
- an anchor positive for several gts takes the first of those of largest IoU.

The compiled kernels live in csrc/assign/; they never build the [A, G] matrices below.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _extension
from ._assign_common import check_gts, compute_dtype, iou_matrix
from ._checks import check, check_dim, check_floating, check_tensors, sizes

OP = "atss_assign"
# mmdetection's ATSSAssigner: INF = 100000000; non-positive overlaps are set to -INF.
INF = 100000000.0


def _nearest_per_level(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [k, G] of the k smallest distances of each column of [A_l, G], equal values
    to the lower index, NaN last. torch.topk picks among equal values arbitrarily, so the
    columns where that choice matters (the k-th value appears more often in the column than
    among the picked) and the columns holding NaN are redone with a stable sort."""
    vals, idx = distances.topk(k, dim=0, largest=False)
    kth = vals[-1]
    ambiguous = (distances == kth).sum(0) > (vals == kth).sum(0)
    ambiguous |= distances.isnan().any(0)
    if bool(ambiguous.any()):
        cols = ambiguous.nonzero().squeeze(1)
        idx[:, cols] = torch.sort(distances[:, cols], dim=0, stable=True).indices[:k]
    return idx


def _atss_one_image(anchors, levels, gts, topk):
    """mmdetection's ATSSAssigner.assign for one image. anchors [A, 4], gts [G, 4] in the
    compute dtype -> (assigned [A] int64, max_iou [A])."""
    A, G = anchors.shape[0], gts.shape[0]
    assigned = torch.zeros(A, dtype=torch.long, device=anchors.device)
    if G == 0 or A == 0:
        return assigned, anchors.new_zeros(A)
    overlaps = iou_matrix(anchors, gts)  # [A, G]

    gt_points = torch.stack(((gts[:, 0] + gts[:, 2]) / 2.0, (gts[:, 1] + gts[:, 3]) / 2.0), 1)
    anchors_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
    anchors_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
    points = torch.stack((anchors_cx, anchors_cy), 1)
    distances = (points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    candidates = []
    start = 0
    for n in levels:
        if n > 0:
            candidates.append(_nearest_per_level(distances[start:start + n], min(topk, n)) + start)
        start += n
    candidate_idxs = torch.cat(candidates, 0)  # [C, G]

    candidate_overlaps = overlaps.gather(0, candidate_idxs)  # [C, G]
    stats = candidate_overlaps.double()
    # Unbiased std; torch gives NaN (with a warning) for a single candidate.
    std = stats.std(0) if stats.shape[0] > 1 else torch.full_like(stats[0], float("nan"))
    threshold = stats.mean(0) + std
    is_pos = stats >= threshold[None, :]

    # The candidate's centre must lie inside the gt by more than 0.01 on all four sides.
    cx, cy = anchors_cx[candidate_idxs], anchors_cy[candidate_idxs]
    ltrb = torch.stack((cx - gts[:, 0], cy - gts[:, 1], gts[:, 2] - cx, gts[:, 3] - cy), 1)
    is_pos &= ltrb.min(dim=1).values > 0.01

    # An anchor positive for several gts takes the gt of largest IoU (max returns the
    # first gt on ties).
    overlaps_inf = torch.full_like(overlaps, -INF)
    gt_idx = torch.arange(G, device=anchors.device).expand_as(candidate_idxs)
    overlaps_inf[candidate_idxs[is_pos], gt_idx[is_pos]] = candidate_overlaps[is_pos]
    max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
    positive = max_overlaps != -INF
    assigned[positive] = argmax_overlaps[positive] + 1
    return assigned, max_overlaps


def check_atss(anchors, num_anchors_per_level: list[int], gt_boxes, gt_counts, topk: int) -> None:
    """The kernels' checks (check_atss in csrc/assign/assign.h), with their messages."""
    check_tensors(OP, anchors=anchors)
    check_dim(anchors, 2, OP, "anchors", "[A, 4]")
    check(anchors.shape[1] == 4, OP, lambda: f"anchors must be [A, 4], got {sizes(anchors.shape)}")
    check_floating(anchors, OP, "anchors")
    check_gts(OP, anchors, "anchors", gt_boxes, gt_counts)
    check(topk > 0, OP, lambda: f"topk must be positive, got {topk}")
    levels = sizes(num_anchors_per_level)
    check(all(n >= 0 for n in num_anchors_per_level), OP,
          lambda: f"num_anchors_per_level must be non-negative, got {levels}")
    A, total = anchors.shape[0], sum(num_anchors_per_level)
    check(total == A, OP, lambda: f"num_anchors_per_level must sum to A = {A}, got {levels} "
                                  f"(sum {total})")


def atss_assign_reference(
    anchors: torch.Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor,
    topk: int = 9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image pure-PyTorch ATSS assignment (mmdetection's, building [A, G] matrices).

    Args:
        anchors: [A, 4] xyxy absolute pixels, the levels' anchors concatenated.
        num_anchors_per_level: A_l per level, summing to A.
        gt_boxes: [B, G, 4] xyxy; image b's gts are gt_boxes[b, :gt_counts[b]], the rest
            is padding and never assigned.
        gt_counts: [B] int64.
        topk: candidates per level and gt.
    Returns:
        assigned [B, A] int64: 0 negative, k + 1 gt k.
        max_iou [B, A]: the assigned gt's IoU for positives, -1e8 for negatives, 0 for every
            anchor of an image without gts; float32 (float64 when a box input is float64).
    Half/bfloat16 boxes are computed in float32.
    """
    num_anchors_per_level = [int(n) for n in num_anchors_per_level]
    check_atss(anchors, num_anchors_per_level, gt_boxes, gt_counts, topk)
    dtype = compute_dtype(anchors, gt_boxes)
    anchors = anchors.to(dtype)
    gt_boxes = gt_boxes.to(dtype)
    results = [
        _atss_one_image(anchors, num_anchors_per_level, gt_boxes[b, :n], topk)
        for b, n in enumerate(gt_counts.tolist())
    ]
    A = anchors.shape[0]
    if not results:
        return anchors.new_zeros((0, A), dtype=torch.long), anchors.new_zeros((0, A))
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def atss_assign(
    anchors: torch.Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: torch.Tensor,
    gt_counts: torch.Tensor,
    topk: int = 9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATSS assignment; same contract as `atss_assign_reference`. Not differentiable.

    The compiled kernel never builds an [A, G] matrix: memory O(B * (A + G * topk * L)).
    """
    check_tensors(OP, anchors=anchors, gt_boxes=gt_boxes, gt_counts=gt_counts)
    if _extension.use_compiled(OP, anchors.device):
        return torch.ops.codetr.atss_assign(
            anchors, [int(n) for n in num_anchors_per_level], gt_boxes, gt_counts, topk)
    return atss_assign_reference(anchors, num_anchors_per_level, gt_boxes, gt_counts, topk)


if _extension.declare(OP):

    @torch.library.register_fake("codetr::atss_assign")
    def _(anchors, num_anchors_per_level, gt_boxes, gt_counts, topk=9):
        check_atss(anchors, list(num_anchors_per_level), gt_boxes, gt_counts, topk)
        B, A = gt_boxes.shape[0], anchors.shape[0]
        dtype = compute_dtype(anchors, gt_boxes)
        return (anchors.new_empty((B, A), dtype=torch.long),
                anchors.new_empty((B, A), dtype=dtype))
