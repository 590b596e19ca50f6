"""What the anchor-based auxiliary heads (ATSS, RetinaNet) share: conv towers, anchors on
the adapter levels, flattening of conv outputs into anchor order, the training forward
skeleton (assign -> losses -> positives), the positives record and the NMS decoding.

A subclass supplies its conv predictors (``level_outputs``), its assigner (``assign``) and
its losses (``losses``); everything else is here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ... import ops
from ...losses.focal import sigmoid_focal_loss
from .common import (AuxPositives, DeltaXYWHCoder, gn_groups, inside_image, level_anchors, pad_gts, random_subset,
                     reduce_mean, touch)


def conv_tower(in_channels: int, feat_channels: int, num_convs: int, norm: bool) -> nn.Sequential:
    """num_convs x (3x3 conv [+ GroupNorm] + ReLU), mmdetection's ConvModule stack (the conv
    has no bias when a norm follows it)."""
    layers = []
    for i in range(num_convs):
        c_in = in_channels if i == 0 else feat_channels
        layers.append(nn.Conv2d(c_in, feat_channels, 3, padding=1, bias=not norm))
        if norm:
            layers.append(nn.GroupNorm(gn_groups(feat_channels), feat_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def flatten_anchor_outputs(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, A * k, H, W] -> [B, H * W * A, k]: via [B, H, W, A, k], the order of
    common.level_anchors (cell-major, the A anchors of a cell contiguous)."""
    B, _, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W * (x.shape[1] // k), k)


def num_positives_avg(num_pos: torch.Tensor) -> float:
    """mmdetection's avg_factor: the number of positives averaged across processes, >= 1
    (a host sync, as in mmdetection)."""
    return max(float(reduce_mean(num_pos.float())), 1.0)


class Scale(nn.Module):
    """A learnable scalar multiplying a level's regression output (mmcv's Scale)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class AnchorHead(nn.Module):
    """Base of the anchor-based auxiliary heads.

    Args:
        num_classes: C foreground classes (sigmoid classifier, no background logit).
        in_channels: channels of the adapter maps.
        strides: the levels' strides, finest first.
        base_sizes: anchor sizes in units of the stride (A_s of them).
        ratios: anchor ratios h / w (A_r of them); A = A_s * A_r anchors per cell.
        bbox_stds: the delta coder's stds.
        max_negatives: negatives kept in the AuxPositives (padding of the query groups).
        nms_pre, score_thr, nms_iou, max_per_img: predict's decoding (mmdetection test_cfg).
    """

    def __init__(self, num_classes: int, in_channels: int, strides: Sequence[int], base_sizes: Sequence[float],
                 ratios: Sequence[float], bbox_stds: Sequence[float], max_negatives: int = 300,
                 nms_pre: int = 1000, score_thr: float = 0.05, nms_iou: float = 0.5, max_per_img: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.strides = tuple(strides)
        self.base_sizes = tuple(float(s) for s in base_sizes)
        self.ratios = tuple(float(r) for r in ratios)
        self.num_anchors = len(self.base_sizes) * len(self.ratios)
        self.coder = DeltaXYWHCoder(bbox_stds)
        self.max_negatives = max_negatives
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img

    # ---- to be supplied by a subclass -------------------------------------------------
    def level_outputs(self, feat: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        """One level's raw conv outputs: (cls [B, A * C, H, W], deltas [B, A * 4, H, W],
        optional extra [B, A * 1, H, W] (ATSS' centerness))."""
        raise NotImplementedError

    def assign(self, anchors: torch.Tensor, num_per_level: list[int], valid: torch.Tensor, gt_boxes: torch.Tensor,
               gt_counts: torch.Tensor) -> torch.Tensor:
        """anchors [N, 4], valid [B, N] -> assigned [B, N] int64: -1 ignored (always where
        not valid), 0 negative, k + 1 gt k."""
        raise NotImplementedError

    def losses(self, anchors: torch.Tensor, outputs: list[torch.Tensor], assigned: torch.Tensor,
               gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's weighted losses from the flattened outputs (see ``forward``)."""
        raise NotImplementedError

    def score_factors(self, outputs: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, N] factors multiplying the classification scores in predict (None: none)."""
        return None

    # ---- shared -----------------------------------------------------------------------
    def init_weights(self, cls_conv: nn.Conv2d, other_convs: Sequence[nn.Conv2d], towers: Sequence[nn.Module],
                       prior_prob: float = 0.01):
        """mmdetection's init: N(0, 0.01) conv weights, zero biases, the classifier's bias at
        -log((1 - p) / p) so that the first focal losses are not swamped by negatives."""
        for m in [*towers, cls_conv, *other_convs]:
            for conv in m.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, std=0.01)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        nn.init.constant_(cls_conv.bias, -math.log((1 - prior_prob) / prior_prob))

    def classification_loss(self, cls: torch.Tensor, assigned: torch.Tensor, gt_labels: torch.Tensor):
        """Focal loss (alpha 0.25, gamma 2) of cls [B, N, C] over the anchors not ignored
        (assigned [B, N] >= 0), summed and divided by the number of positives (averaged
        over processes, >= 1). Returns (loss, (b_idx, a_idx, gt_idx) [P] of the positives,
        that number)."""
        used = assigned >= 0
        b_idx, a_idx = torch.nonzero(assigned > 0, as_tuple=True)
        gt_idx = assigned[b_idx, a_idx] - 1
        targets = torch.zeros_like(cls)
        targets[b_idx, a_idx, gt_labels[b_idx, gt_idx]] = 1.0
        num_pos = num_positives_avg(torch.tensor(float(b_idx.numel()), device=cls.device))
        loss = sigmoid_focal_loss(cls[used], targets[used]).sum() / num_pos
        return loss, (b_idx, a_idx, gt_idx), num_pos

    def anchors(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """(anchors [N, 4] xyxy of all levels concatenated, N_j per level, cell [N] int64:
        index of each anchor's cell in the levels' flattened maps concatenated)."""
        anchors, cells, offset = [], [], 0
        for feat, s in zip(feats, self.strides):
            H, W = feat.shape[-2:]
            anchors.append(level_anchors((H, W), s, [b * s for b in self.base_sizes], self.ratios, feat.device))
            cells.append(torch.arange(H * W, device=feat.device).repeat_interleave(self.num_anchors) + offset)
            offset += H * W
        return torch.cat(anchors), [a.shape[0] for a in anchors], torch.cat(cells)

    def flat_outputs(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every output of level_outputs flattened to [B, N, k] and concatenated over levels,
        in float32 (losses and decoding run in fp32 under autocast)."""
        per_level = [self.level_outputs(f, j) for j, f in enumerate(feats)]
        flat = []
        for i in range(len(per_level[0])):
            k = per_level[0][i].shape[1] // self.num_anchors
            flat.append(torch.cat([flatten_anchor_outputs(lv[i], k) for lv in per_level], 1).float())
        return flat

    def forward(self, feats: Sequence[torch.Tensor], targets: list[dict],
                image_sizes: torch.Tensor) -> tuple[dict[str, torch.Tensor], AuxPositives]:
        """Training forward (common.py's contract).

        feats: J maps [B, C_in, H_j, W_j]; targets: B dicts "boxes" [G_b, 4], "labels" [G_b];
        image_sizes: [B, 2] (h, w). Returns (losses, AuxPositives).
        """
        anchors, num_per_level, cells = self.anchors(feats)
        outputs = self.flat_outputs(feats)  # [cls [B, N, C], deltas [B, N, 4], ...]
        device = anchors.device
        gt_boxes, gt_counts = pad_gts(targets, device)
        gt_labels = torch.zeros(gt_boxes.shape[:2], dtype=torch.long, device=device)
        for b, t in enumerate(targets):
            gt_labels[b, :len(t["labels"])] = t["labels"].to(device)
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        valid = inside_image(centres, image_sizes.to(device))
        with torch.no_grad():
            assigned = self.assign(anchors, num_per_level, valid, gt_boxes, gt_counts)
        losses = self.losses(anchors, outputs, assigned, gt_boxes, gt_labels)
        # Every loss touches every output, so each one reaches every parameter (DDP).
        zero = touch(*outputs)
        losses = {k: v + zero for k, v in losses.items()}
        return losses, self.positives(feats, anchors, cells, assigned, gt_boxes, gt_labels)

    def positives(self, feats: Sequence[torch.Tensor], anchors: torch.Tensor, cells: torch.Tensor,
                  assigned: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> AuxPositives:
        """The AuxPositives of an assignment [B, N]: positive anchors with their gt and the
        adapter feature of their own cell (shared by the A anchors of the cell), and up to
        max_negatives random negatives."""
        # [B, C, sum_j H_j W_j]: the cells of all levels in the order of ``cells``.
        flat_feats = torch.cat([f.flatten(2) for f in feats], 2)
        out = AuxPositives([], [], [], [], [], [])
        for b in range(assigned.shape[0]):
            pos = torch.nonzero(assigned[b] > 0).squeeze(1)
            gt = assigned[b, pos] - 1
            neg = random_subset(torch.nonzero(assigned[b] == 0).squeeze(1), self.max_negatives)
            out.pos_boxes.append(anchors[pos].detach())
            out.pos_labels.append(gt_labels[b, gt])
            out.pos_gt_boxes.append(gt_boxes[b, gt])
            out.pos_feats.append(flat_feats[b, :, cells[pos]].t())
            out.neg_boxes.append(anchors[neg].detach())
            out.neg_feats.append(flat_feats[b, :, cells[neg]].t())
        return out

    @torch.no_grad()
    def predict(self, feats: Sequence[torch.Tensor], image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections of the head alone (mmdetection's dense-head test path): per level the
        nms_pre best (anchor, class) scores above score_thr, decoded and clipped to the
        image (empty boxes dropped), scores times the score factors (ATSS: centerness),
        class-wise NMS, the max_per_img best. Returns B dicts "boxes" [M, 4], "scores" [M] (descending),
        "labels" [M]."""
        anchors, num_per_level, _ = self.anchors(feats)
        outputs = self.flat_outputs(feats)
        cls_scores, deltas = outputs[0].sigmoid(), outputs[1]
        factors = self.score_factors(outputs)
        results = []
        for b in range(cls_scores.shape[0]):
            boxes, scores, labels, start = [], [], [], 0
            for n in num_per_level:
                s = cls_scores[b, start:start + n]  # [n, C]
                keep = torch.nonzero(s > self.score_thr)  # [K, 2] (anchor, class)
                top = s[keep[:, 0], keep[:, 1]].sort(descending=True).indices[:self.nms_pre]
                idx, cls = keep[top, 0] + start, keep[top, 1]
                score = cls_scores[b, idx, cls]
                if factors is not None:
                    score = score * factors[b, idx]
                boxes.append(self.coder.decode(anchors[idx], deltas[b, idx], image_sizes[b].to(anchors.device)))
                scores.append(score)
                labels.append(cls)
                start += n
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            # mmdetection's min_bbox_size = 0: drop boxes that clipping left empty.
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
            keep = ops.batched_nms(boxes, scores, labels, self.nms_iou)[:self.max_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


__all__ = ["AnchorHead", "Scale", "conv_tower", "flatten_anchor_outputs", "num_positives_avg"]
