"""FCOS auxiliary head of Co-DETR (Tian et al., 2019; mmdetection's FCOSHead with
norm_on_bbox, centerness_on_reg and center_sampling).

Point-based: each cell centre of each level is a point. A point is positive for a gt when
it lies inside the gt's centre region (gt centre +- radius * stride, clipped to the gt box)
and its largest distance to the box sides lies in the level's regression range; several
candidates -> the gt of minimum area. Co-DETR's customized positive queries for FCOS are
squares of side 8 * 2^(2 + j) centred on the positive points of level j.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codetr.losses.focal import sigmoid_focal_loss
from codetr.ops import batched_nms, generalized_box_iou_loss

from .common import (DEFAULT_STRIDES, AuxPositives, gn_groups, inside_image, level_centers, random_subset,
                     reduce_mean, touch)

INF = float("inf")


def default_regress_ranges(num_levels: int) -> tuple[tuple[float, float], ...]:
    """mmdetection's FCOS ranges ((-1, 64), (64, 128), (128, 256), (256, 512), (512, inf))
    for 5 levels; for another number of levels the edges keep doubling from 64 and the last
    level is open-ended (e.g. 3 levels: (-1, 64), (64, 128), (128, inf))."""
    edges = [-1.0] + [64.0 * 2 ** k for k in range(num_levels - 1)] + [INF]
    return tuple((edges[j], edges[j + 1]) for j in range(num_levels))


def fcos_assign(points: torch.Tensor, point_strides: torch.Tensor, point_ranges: torch.Tensor,
                valid: torch.Tensor, gt_boxes: torch.Tensor, radius: float = 1.5) -> torch.Tensor:
    """FCOS targets with centre sampling, one image.

    points [N, 2] (x, y) pixels; point_strides [N]; point_ranges [N, 2] (lo, hi) regression
    range of each point's level; valid [N] bool (False: centre in the padding, never
    positive); gt_boxes [G, 4] xyxy. Returns [N] int64: the assigned gt index, -1 for
    background.
    """
    N, G = points.shape[0], gt_boxes.shape[0]
    if G == 0:
        return torch.full((N,), -1, dtype=torch.long, device=points.device)
    points, gt_boxes = points.float(), gt_boxes.float()
    x, y = points[:, 0:1], points[:, 1:2]  # [N, 1]
    x1, y1, x2, y2 = gt_boxes[None].unbind(-1)  # [1, G] each
    ltrb = torch.stack((x - x1, y - y1, x2 - x, y2 - y), -1)  # [N, G, 4]
    # Centre region: the gt centre +- radius * stride of the point's level, clipped to the
    # box, so "inside the region" implies "inside the box" (the clipping keeps small boxes).
    r = (point_strides.float() * radius)[:, None]  # [N, 1]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx1, ry1 = torch.maximum(cx - r, x1), torch.maximum(cy - r, y1)
    rx2, ry2 = torch.minimum(cx + r, x2), torch.minimum(cy + r, y2)
    in_centre = (x > rx1) & (y > ry1) & (x < rx2) & (y < ry2)  # [N, G]
    # Scale assignment: the level regresses only distances in its range.
    max_dist = ltrb.max(-1).values
    lo, hi = point_ranges[:, 0:1].float(), point_ranges[:, 1:2].float()
    in_range = (max_dist >= lo) & (max_dist <= hi)
    areas = ((x2 - x1) * (y2 - y1)).expand(N, G)
    areas = torch.where(in_centre & in_range & valid[:, None], areas, areas.new_tensor(INF))
    min_area, index = areas.min(dim=1)  # ties -> the first (lowest-index) gt
    return torch.where(min_area < INF, index, index.new_tensor(-1))


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    """[P, 4] distances (l, t, r, b) > 0 -> [P] sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))


def distance_to_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """points [..., 2], distances [..., 4] (l, t, r, b) -> xyxy boxes [..., 4]."""
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)


class FCOSHead(nn.Module):
    """FCOS head on the J adapter levels (see common.py for the forward/predict contract).

    Args:
        num_classes: C (sigmoid classification, no background logit).
        in_channels: adapter channels; feat_channels: tower channels (default in_channels).
        strides: the levels' strides, finest first.
        stacked_convs: 3x3 conv + GroupNorm + ReLU blocks per tower (1 in Co-DETR's aux heads).
        regress_ranges: (lo, hi) per level; default ``default_regress_ranges(len(strides))``.
        center_sample_radius: centre region half-side, in strides of the point's level.
        loss_cls_weight, loss_bbox_weight, loss_centerness_weight: relative loss weights.
        max_negatives: negatives recorded per image in the AuxPositives.
        prior_prob: initial foreground probability of the classifier (bias init).
        nms_pre, score_thr, nms_iou, max_per_img: predict's decoding settings.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, strides: Sequence[int] = DEFAULT_STRIDES,
                 feat_channels: Optional[int] = None, stacked_convs: int = 1,
                 regress_ranges: Optional[Sequence[Sequence[float]]] = None, center_sample_radius: float = 1.5,
                 loss_cls_weight: float = 1.0, loss_bbox_weight: float = 1.0, loss_centerness_weight: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, max_negatives: int = 300,
                 prior_prob: float = 0.01, nms_pre: int = 1000, score_thr: float = 0.05, nms_iou: float = 0.6,
                 max_per_img: int = 100):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.strides = tuple(int(s) for s in strides)
        feat_channels = feat_channels or in_channels
        if regress_ranges is None:
            regress_ranges = default_regress_ranges(len(self.strides))
        if len(regress_ranges) != len(self.strides):
            raise ValueError(f"FCOSHead: {len(regress_ranges)} regress_ranges for {len(self.strides)} strides")
        self.regress_ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)
        self.center_sample_radius = center_sample_radius
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.loss_centerness_weight = loss_centerness_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.max_negatives = max_negatives
        self.nms_pre, self.score_thr, self.nms_iou, self.max_per_img = nms_pre, score_thr, nms_iou, max_per_img

        def tower() -> nn.Sequential:
            layers = []
            for i in range(stacked_convs):
                c = in_channels if i == 0 else feat_channels
                # No conv bias: GroupNorm's shift replaces it (mmdetection's conv_bias="auto").
                layers += [nn.Conv2d(c, feat_channels, 3, padding=1, bias=False),
                           nn.GroupNorm(gn_groups(feat_channels), feat_channels), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_convs, self.reg_convs = tower(), tower()
        out_channels = feat_channels if stacked_convs > 0 else in_channels
        self.conv_cls = nn.Conv2d(out_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(out_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(out_channels, 1, 3, padding=1)
        # One learnable scale per level: levels share the convs but regress distances of
        # different sizes.
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    # ------------------------------------------------------------------ raw outputs
    def forward_levels(self, feats: Sequence[torch.Tensor]):
        """feats: J maps [B, C_in, H_j, W_j] -> three lists over levels, flattened row-major:
        cls logits [B, H_j*W_j, C], distances [B, H_j*W_j, 4] (l, t, r, b) in pixels (fp32),
        centerness logits [B, H_j*W_j]."""
        cls_out, reg_out, ctr_out = [], [], []
        for j, x in enumerate(feats):
            cls_feat, reg_feat = self.cls_convs(x), self.reg_convs(x)
            cls_out.append(self.conv_cls(cls_feat).flatten(2).transpose(1, 2))
            # norm_on_bbox: the net predicts distances in strides of its level, kept >= 0
            # by a ReLU (not exp); we return pixels (GIoU is scale invariant, so the loss
            # equals mmdetection's stride-normalised one).
            d = F.relu(self.scales[j] * self.conv_reg(reg_feat).float()) * self.strides[j]
            reg_out.append(d.flatten(2).transpose(1, 2))
            ctr_out.append(self.conv_centerness(reg_feat).flatten(1))  # centerness_on_reg
        return cls_out, reg_out, ctr_out

    def points(self, feats: Sequence[torch.Tensor]):
        """-> points [N, 2] (x, y), level index [N], stride [N], regression range [N, 2],
        N = sum_j H_j * W_j, level-major then row-major (the order of forward_levels)."""
        device = feats[0].device
        pts, lvl = [], []
        for j, x in enumerate(feats):
            c = level_centers(x.shape[-2:], self.strides[j], device, offset=0.5)
            pts.append(c)
            lvl.append(torch.full((c.shape[0],), j, dtype=torch.long, device=device))
        lvl = torch.cat(lvl)
        strides = torch.tensor(self.strides, dtype=torch.float32, device=device)[lvl]
        ranges = torch.tensor(self.regress_ranges, dtype=torch.float32, device=device)[lvl]
        return torch.cat(pts), lvl, strides, ranges

    def query_boxes(self, points: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Co-DETR's FCOS boxes for the customized positive queries: squares of side
        8 * 2^(2 + j) (32 px on level 0, doubling per level) centred on each point.
        points [P, 2], levels [P] -> [P, 4] xyxy, not clipped to the image."""
        half = (8.0 * 2.0 ** (2 + levels.float()) / 2)[:, None]
        return torch.cat((points - half, points + half), -1)

    # ------------------------------------------------------------------ training
    def forward(self, feats: Sequence[torch.Tensor], targets: list[dict], image_sizes: torch.Tensor):
        """-> (losses {"loss_cls", "loss_bbox", "loss_centerness"}, AuxPositives)."""
        cls_out, reg_out, ctr_out = self.forward_levels(feats)
        cls_logits = torch.cat(cls_out, 1).float()  # [B, N, C]
        dists = torch.cat(reg_out, 1)  # [B, N, 4]
        ctr_logits = torch.cat(ctr_out, 1).float()  # [B, N]
        points, levels, point_strides, ranges = self.points(feats)
        valid = inside_image(points, image_sizes.to(points.device))  # [B, N]
        B = valid.shape[0]

        assigned = torch.stack([
            fcos_assign(points, point_strides, ranges, valid[b], t["boxes"].to(points.device),
                        self.center_sample_radius) for b, t in enumerate(targets)])  # [B, N]
        pos = assigned >= 0
        pos_b, pos_n = pos.nonzero(as_tuple=True)
        gt_boxes = [t["boxes"].to(points.device).float() for t in targets]
        gt_labels = [t["labels"].to(points.device) for t in targets]
        pos_gt = torch.cat([gt_boxes[b][assigned[b, pos[b]]] for b in range(B)])  # [P, 4], order of pos_b
        pos_lab = torch.cat([gt_labels[b][assigned[b, pos[b]]] for b in range(B)])

        num_pos = reduce_mean(torch.tensor(float(pos_b.numel()), device=points.device)).clamp(min=1.0)

        # Classification: focal loss on every point in the image (padding ignored).
        onehot = torch.zeros_like(cls_logits)
        onehot[pos_b, pos_n, pos_lab] = 1.0
        loss_cls = sigmoid_focal_loss(cls_logits[valid], onehot[valid], self.focal_alpha,
                                      self.focal_gamma).sum() / num_pos

        # Box: GIoU of the decoded positive boxes, weighted by their centerness target.
        pos_points = points[pos_n]
        ctr_target = centerness_target(torch.cat((pos_points - pos_gt[:, :2], pos_gt[:, 2:] - pos_points), -1))
        ctr_denom = reduce_mean(ctr_target.sum()).clamp(min=1e-6)
        pred_boxes = distance_to_boxes(pos_points, dists[pos_b, pos_n])
        giou = generalized_box_iou_loss(pred_boxes, pos_gt)
        loss_bbox = (giou * ctr_target).sum() / ctr_denom
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits[pos_b, pos_n], ctr_target,
                                                      reduction="sum") / num_pos
        # Zero terms so that every parameter gets a gradient without positives (DDP).
        zero = touch(cls_logits, dists, ctr_logits)
        losses = {"loss_cls": self.loss_cls_weight * loss_cls + zero,
                  "loss_bbox": self.loss_bbox_weight * loss_bbox + zero,
                  "loss_centerness": self.loss_centerness_weight * loss_ctr + zero}

        # Customized positive queries: the adapter feature at the point's own cell.
        flat_feats = torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)  # [B, N, C_in]
        boxes = self.query_boxes(points, levels)  # [N, 4], constants
        P = AuxPositives([], [], [], [], [], [])
        counts = pos.sum(1).tolist()
        for b, (lab, gtb) in enumerate(zip(pos_lab.split(counts), pos_gt.split(counts))):
            idx = pos[b].nonzero(as_tuple=True)[0]
            neg = random_subset((valid[b] & ~pos[b]).nonzero(as_tuple=True)[0], self.max_negatives)
            P.pos_boxes.append(boxes[idx])
            P.pos_labels.append(lab)
            P.pos_gt_boxes.append(gtb)
            P.pos_feats.append(flat_feats[b, idx])
            P.neg_boxes.append(boxes[neg])
            P.neg_feats.append(flat_feats[b, neg])
        return losses, P

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, feats: Sequence[torch.Tensor], image_sizes: torch.Tensor) -> list[dict]:
        """-> B dicts {"boxes" [K, 4] xyxy clipped to the image, "scores" [K] decreasing,
        "labels" [K]}, K <= max_per_img. Score = sigmoid(cls) * sigmoid(centerness); as
        mmdetection, score_thr applies to sigmoid(cls) and the nms_pre best (point, class)
        pairs of each level by the product go to a class-wise NMS."""
        cls_out, reg_out, ctr_out = self.forward_levels(feats)
        points, _, _, _ = self.points(feats)
        valid = inside_image(points, image_sizes.to(points.device))
        sizes = [x.shape[-2] * x.shape[-1] for x in feats]
        results = []
        for b in range(len(image_sizes)):
            h, w = image_sizes[b].tolist()
            all_boxes, all_scores, all_labels = [], [], []
            start = 0
            for j, n in enumerate(sizes):
                keep_pt = valid[b, start:start + n]
                cls = cls_out[j][b].float().sigmoid()[keep_pt]  # [n', C]
                ctr = ctr_out[j][b].float().sigmoid()[keep_pt]
                boxes = distance_to_boxes(points[start:start + n][keep_pt], reg_out[j][b][keep_pt])
                start += n
                pt, cl = (cls > self.score_thr).nonzero(as_tuple=True)
                scores = cls[pt, cl] * ctr[pt]
                top = scores.topk(min(self.nms_pre, scores.numel())).indices
                all_boxes.append(boxes[pt[top]])
                all_scores.append(scores[top])
                all_labels.append(cl[top])
            boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
            lim = boxes.new_tensor([w, h, w, h])
            boxes = torch.minimum(boxes.clamp(min=0), lim)
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
