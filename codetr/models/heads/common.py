"""What every auxiliary (one-to-many) head of Co-DETR shares: the head contract, priors on
the adapter levels, the delta box coder, and the record of positives that become the
customized positive queries.

Head contract (``AuxHead``)
---------------------------
``forward(feats, targets, image_sizes) -> (losses, positives)`` in training:

    feats: J adapter maps [B, C, H_j, W_j], strides ``head.strides`` (8, 16, ..., 128),
        finest first; they cover the padded batch (padding is at the bottom/right).
    targets: B dicts, "boxes" [G_b, 4] xyxy absolute pixels of the (transformed) image,
        "labels" [G_b] int64 in [0, C).
    image_sizes: [B, 2] int64 (h, w) of the unpadded images; priors whose centre lies in
        the padding are never positive or negative.
    losses: the head's own losses with the paper's relative weights applied, each a scalar
        that touches every parameter of the head (also without gts, so DDP sees no unused
        parameter). Co-DETR multiplies them by num_decoder_layers * lambda2.
    positives: ``AuxPositives`` (below).

``predict(feats, image_sizes) -> B dicts {"boxes" [N, 4] xyxy pixels, "scores" [N],
"labels" [N]}`` decodes with the head alone (with NMS), a diagnostic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

#: The adapter's J = 5 levels.
DEFAULT_STRIDES = (8, 16, 32, 64, 128)


@dataclass
class AuxPositives:
    """Per image b (lists of length B), everything detached except the features:

    pos_boxes[b]    [P_b, 4] xyxy pixels: the positive anchors / proposals / FCOS squares,
                    which become the reference boxes of the positive queries.
    pos_labels[b]   [P_b] int64 the gt label the head assigned to each positive.
    pos_gt_boxes[b] [P_b, 4] xyxy pixels: the gt box the head assigned.
    pos_feats[b]    [P_b, C] the adapter feature at the positive's own cell (anchor and
                    point heads) or its mean-pooled RoIAlign feature (R-CNN); undetached.
    neg_boxes[b], neg_feats[b]: the same for up to ``max_negatives`` of the head's
                    negatives, drawn at random, used to pad groups of images with few
                    positives (they get the background label and no box loss).
    """

    pos_boxes: list[torch.Tensor]
    pos_labels: list[torch.Tensor]
    pos_gt_boxes: list[torch.Tensor]
    pos_feats: list[torch.Tensor]
    neg_boxes: list[torch.Tensor]
    neg_feats: list[torch.Tensor]


def level_centers(shape: Sequence[int], stride: float, device, dtype=torch.float32,
                  offset: float = 0.0) -> torch.Tensor:
    """[H * W, 2] (x, y) = ((i + offset) * stride) of a level's cells, row-major (the order
    of ``feat.flatten(2)``). offset 0 puts anchors at the cell's top-left corner, as
    mmdetection's AnchorGenerator (center_offset=0) in the official Co-DETR heads; point
    heads (FCOS) use 0.5, the cell centre."""
    H, W = int(shape[0]), int(shape[1])
    ys, xs = torch.meshgrid(torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack(((xs.reshape(-1) + offset) * stride, (ys.reshape(-1) + offset) * stride), -1)


def level_anchors(shape: Sequence[int], stride: float, base_sizes: Sequence[float], ratios: Sequence[float],
                  device, dtype=torch.float32) -> torch.Tensor:
    """[H * W * A, 4] xyxy anchors centred on each cell's ``level_centers`` (offset 0, as
    mmdetection), A = len(base_sizes) * len(ratios),
    cell-major (the A anchors of a cell are contiguous, matching a conv output
    [B, A * k, H, W] permuted to [B, H, W, A, k]). ratio = h / w, area = base_size ** 2."""
    centers = level_centers(shape, stride, device, dtype)
    wh = []
    for r in ratios:
        for s in base_sizes:
            w = s / math.sqrt(r)
            wh.append((w, w * r))
    wh = torch.tensor(wh, device=device, dtype=dtype)  # [A, 2]
    c = centers[:, None, :]
    return torch.cat((c - wh / 2, c + wh / 2), -1).reshape(-1, 4)


def inside_image(points: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """points [A, 2] (x, y), image_sizes [B, 2] (h, w) -> [B, A] bool: centre in the image."""
    h, w = image_sizes[:, 0:1].to(points.dtype), image_sizes[:, 1:2].to(points.dtype)
    return (points[None, :, 0] < w) & (points[None, :, 1] < h)


class DeltaXYWHCoder:
    """R-CNN box deltas (dx, dy, dw, dh) normalised by ``stds`` (mmdetection's
    DeltaXYWHBBoxCoder with zero means). decode clamps dw, dh to log(1000 / 16) so exp
    cannot overflow."""

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(1000.0 / 16))

    def encode(self, priors: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
        """priors, gts [..., 4] xyxy -> deltas [..., 4]."""
        pw, ph = priors[..., 2] - priors[..., 0], priors[..., 3] - priors[..., 1]
        px, py = priors[..., 0] + 0.5 * pw, priors[..., 1] + 0.5 * ph
        gw, gh = gts[..., 2] - gts[..., 0], gts[..., 3] - gts[..., 1]
        gx, gy = gts[..., 0] + 0.5 * gw, gts[..., 1] + 0.5 * gh
        d = torch.stack(((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), -1)
        return d / d.new_tensor(self.stds)

    def decode(self, priors: torch.Tensor, deltas: torch.Tensor,
               max_shape: Optional[torch.Tensor] = None) -> torch.Tensor:
        """priors [..., 4], deltas [..., 4] -> boxes [..., 4] xyxy, clipped to max_shape
        [..., 2] (h, w) when given (broadcast against the leading dims)."""
        d = deltas * deltas.new_tensor(self.stds)
        dw, dh = d[..., 2].clamp(-self.max_ratio, self.max_ratio), d[..., 3].clamp(-self.max_ratio, self.max_ratio)
        pw, ph = priors[..., 2] - priors[..., 0], priors[..., 3] - priors[..., 1]
        px, py = priors[..., 0] + 0.5 * pw, priors[..., 1] + 0.5 * ph
        cx, cy = px + d[..., 0] * pw, py + d[..., 1] * ph
        w, h = pw * dw.exp(), ph * dh.exp()
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)
        if max_shape is not None:
            hw = max_shape.to(boxes.dtype)
            lim = torch.stack((hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]), -1)
            boxes = torch.minimum(boxes.clamp(min=0), lim)
        return boxes


def pad_gts(targets: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """B target dicts -> (gt_boxes [B, G_max, 4] float32 zero-padded, gt_counts [B] int64),
    the layout of ops.atss_assign / ops.max_iou_assign."""
    counts = torch.tensor([len(t["boxes"]) for t in targets], dtype=torch.long, device=device)
    G = max(int(counts.max()) if len(targets) else 0, 1)
    boxes = torch.zeros(len(targets), G, 4, device=device)
    for b, t in enumerate(targets):
        boxes[b, :len(t["boxes"])] = t["boxes"].to(device, torch.float32)
    return boxes, counts


def random_subset(index: torch.Tensor, k: int) -> torch.Tensor:
    """Up to k entries of a 1-d index tensor drawn without replacement (global torch RNG,
    so seeded runs repeat)."""
    if index.numel() <= k:
        return index
    return index[torch.randperm(index.numel(), device=index.device)[:k]]


def touch(*tensors: torch.Tensor) -> torch.Tensor:
    """0 * sum of the tensors: added to a loss so every parameter that produced them gets a
    (zero) gradient even when no sample selects them (DDP requires it)."""
    return sum(t.sum() * 0.0 for t in tensors)


def gn_groups(channels: int) -> int:
    """GroupNorm groups: 32 (mmdetection's GN config) when it divides ``channels``, else the
    largest divisor below 32 (small test widths)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the processes (itself without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x
