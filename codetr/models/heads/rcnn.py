"""Faster R-CNN auxiliary head of Co-DETR (Ren et al., 2015): a region proposal network
(RPN) and a two-FC RoI head, mmdetection's RPNHead + StandardRoIHead/Shared2FCBBoxHead as
configured in the official co_deformable_detr_r50_1x_coco.

Training (``forward``):
  RPN      anchors (3 octave scales x 3 ratios per cell), MaxIoU assignment (0.7 / 0.3,
           low-quality matches >= 0.3), 256 sampled anchors per image (half positive at
           most); BCE objectness + L1 deltas, both averaged over the sampled anchors.
  proposals (no gradient) per image: top ``nms_pre`` scores per level, decoded, clipped,
           NMS 0.7 within each level, the best ``max_proposals``.
  RoI head the gts are added as proposals; MaxIoU assignment (0.5, no low-quality
           matches); 512 sampled RoIs per image (a quarter positive at most); RoIAlign 7x7
           on the first ``roi_num_levels`` levels -> 2 shared FCs -> softmax classifier
           (background = num_classes) and box deltas decoded and trained with GIoU
           (reg_decoded_bbox). Both losses are averaged over the sampled RoIs (mmdetection).
  positives the positive sampled RoIs (Co-DETR's customized positive queries for R-CNN)
           with their mean-pooled RoIAlign feature.
The loss normalisers are this process's sampled counts, as mmdetection (no all_reduce:
with fixed sampler budgets they hardly vary between processes).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from .common import (DEFAULT_STRIDES, AuxPositives, DeltaXYWHCoder, inside_image, level_anchors,
                     level_centers, pad_gts, random_subset, touch)


def sample(assigned: torch.Tensor, num: int, pos_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdetection's RandomSampler (neg_pos_ub -1) on one image's assignment.

    assigned [N] int64 (-1 ignored, 0 negative, k + 1 gt k) -> (pos [P], neg [Q]) indices,
    P <= int(num * pos_fraction), Q <= num - P; drawn with the global torch RNG.
    """
    pos = torch.nonzero(assigned > 0).squeeze(1)
    pos = random_subset(pos, int(num * pos_fraction))
    neg = torch.nonzero(assigned == 0).squeeze(1)
    neg = random_subset(neg, num - pos.numel())
    return pos, neg


class RCNNHead(nn.Module):
    """RPN + RoI head (Faster R-CNN) as a Co-DETR auxiliary head (contract in common.py).

    Args:
        num_classes: foreground classes K (the classifier has K + 1 outputs, background last).
        in_channels: C of the adapter maps (also the RPN conv width, as mmdetection's
            feat_channels = in_channels).
        strides: the J levels' strides, finest first.
        octave_base_scale, scales_per_octave, ratios: anchors of size
            octave_base_scale * 2 ** (i / scales_per_octave) * stride, ratio = h / w
            (official Co-DETR: 4, 3, (0.5, 1, 2) -> A = 9 anchors per cell).
        rpn_num, rpn_pos_fraction: RPN sampler (256, 0.5).
        train_nms_pre, test_nms_pre: proposals kept per level before NMS (official:
            4000 in training, 1000 at test).
        rpn_nms_iou, max_proposals: proposal NMS threshold (0.7) and proposals per image (1000).
        roi_num_levels: RoIAlign reads the first levels only (official featmap_strides
            (8, 16, 32, 64): 4).
        finest_scale: SingleRoIExtractor's finest_scale (official 112).
        roi_size, fc_channels: RoIAlign bins per side (7) and FC width (1024).
        roi_num, roi_pos_fraction: RoI sampler (512, 0.25).
        reg_class_agnostic: one box per RoI (True) or one per class (False, official).
        loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox: relative loss weights (1, 1, 1,
            10: the official GIoU weight).
        max_negatives: negatives returned in AuxPositives per image (300).
        score_thr, nms_iou, max_per_img: ``predict`` post-processing (official test_cfg: 0.0, 0.5, 100).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, strides: Sequence[int] = DEFAULT_STRIDES, *,
                 octave_base_scale: float = 4.0, scales_per_octave: int = 3,
                 ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 rpn_num: int = 256, rpn_pos_fraction: float = 0.5,
                 train_nms_pre: int = 4000, test_nms_pre: int = 1000, rpn_nms_iou: float = 0.7,
                 max_proposals: int = 1000,
                 roi_num_levels: int = 4, finest_scale: float = 112.0, roi_size: int = 7,
                 fc_channels: int = 1024, roi_num: int = 512, roi_pos_fraction: float = 0.25,
                 reg_class_agnostic: bool = False,
                 loss_rpn_cls: float = 1.0, loss_rpn_bbox: float = 1.0, loss_cls: float = 1.0,
                 loss_bbox: float = 10.0, max_negatives: int = 300,
                 score_thr: float = 0.0, nms_iou: float = 0.5, max_per_img: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.scales = tuple(octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave))
        self.ratios = tuple(ratios)
        self.num_anchors = len(self.scales) * len(self.ratios)
        self.rpn_num, self.rpn_pos_fraction = rpn_num, rpn_pos_fraction
        self.train_nms_pre, self.test_nms_pre = train_nms_pre, test_nms_pre
        self.rpn_nms_iou, self.max_proposals = rpn_nms_iou, max_proposals
        self.roi_num, self.roi_pos_fraction = roi_num, roi_pos_fraction
        self.reg_class_agnostic = reg_class_agnostic
        self.w_rpn_cls, self.w_rpn_bbox, self.w_cls, self.w_bbox = loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox
        self.max_negatives = max_negatives
        self.score_thr, self.nms_iou, self.max_per_img = score_thr, nms_iou, max_per_img
        self.rpn_coder = DeltaXYWHCoder((1.0, 1.0, 1.0, 1.0))
        self.roi_coder = DeltaXYWHCoder((0.1, 0.1, 0.2, 0.2))

        A = self.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, A, 1)  # one sigmoid objectness per anchor
        self.rpn_reg = nn.Conv2d(in_channels, 4 * A, 1)
        self.roi_align = ops.MultiScaleRoIAlign(roi_size, self.strides[:roi_num_levels], sampling_ratio=0,
                                                aligned=True, finest_scale=finest_scale)
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_size * roi_size, fc_channels),
                                         nn.Linear(fc_channels, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 if reg_class_agnostic else 4 * num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdetection's init: RPN convs N(0, 0.01); shared FCs Xavier uniform; classifier
        N(0, 0.01), regressor N(0, 0.001); biases 0."""
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    # ---------------------------------------------------------------- RPN
    def rpn_forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """J maps [B, C, H_j, W_j] -> per level objectness logits [B, H_j * W_j * A] and
        deltas [B, H_j * W_j * A, 4], in level_anchors' (cell-major) order."""
        logits, deltas = [], []
        for x in feats:
            B, _, H, W = x.shape
            x = F.relu(self.rpn_conv(x))
            logits.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(B, -1))
            deltas.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(B, -1, 4))
        return logits, deltas

    def anchors(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: anchors [H_j * W_j * A, 4] xyxy and their cell centres [H_j * W_j * A, 2]."""
        anchors, centers = [], []
        for x, s in zip(feats, self.strides):
            shape, dev = x.shape[-2:], x.device
            anchors.append(level_anchors(shape, s, [k * s for k in self.scales], self.ratios, dev))
            centers.append(level_centers(shape, s, dev).repeat_interleave(self.num_anchors, 0))
        return anchors, centers

    def rpn_assign(self, anchors: torch.Tensor, centers: torch.Tensor, gt_boxes: torch.Tensor,
                   gt_counts: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """anchors [N, 4], centers [N, 2], gt_boxes [B, G, 4], gt_counts [B], image_sizes
        [B, 2] -> assigned [B, N] (-1 ignored, 0 negative, k + 1 gt k).

        Anchors whose centre is in the padding take no part in the assignment (mmdetection
        drops invalid anchors before assigning, so a gt's low-quality match is its best
        *valid* anchor): they are replaced by an empty box, which overlaps no gt, and
        marked ignored afterwards.
        """
        inside = inside_image(centers, image_sizes)  # [B, N]
        priors = torch.where(inside[..., None], anchors.float()[None], anchors.new_full((4,), -1.0))
        assigned, _ = ops.max_iou_assign(priors, gt_boxes, gt_counts, pos_iou_thr=0.7, neg_iou_thr=0.3,
                                         min_pos_iou=0.3, match_low_quality=True)
        return assigned.masked_fill(~inside, -1)

    @torch.no_grad()
    def proposals(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                  image_sizes: torch.Tensor, nms_pre: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """mmdetection's RPNHead proposals per image: (boxes [M_b, 4], scores [M_b]), by
        decreasing score, M_b <= max_proposals; no gradient.

        Per level the ``nms_pre`` best anchors are decoded and clipped to the image; boxes
        without area are dropped (min_bbox_size 0); NMS runs within each level (batched
        over levels by level id, as mmdetection does).
        """
        out = []
        for b in range(image_sizes.shape[0]):
            boxes, scores, levels = [], [], []
            for j, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
                s = lg[b].detach().float().sigmoid()
                if 0 < nms_pre < s.numel():
                    s, idx = s.topk(nms_pre)
                else:
                    s, idx = s.sort(descending=True)
                boxes.append(self.rpn_coder.decode(an[idx].float(), dl[b, idx].detach().float(), image_sizes[b]))
                scores.append(s)
                levels.append(torch.full_like(idx, j))
            boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
            keep = ops.batched_nms(boxes, scores, levels, self.rpn_nms_iou)[:self.max_proposals]
            out.append((boxes[keep], scores[keep]))
        return out

    # ---------------------------------------------------------------- RoI head
    def roi_assign(self, proposals: torch.Tensor, gt_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image: proposals [M, 4], gt_boxes [G, 4] -> (boxes [G + M, 4], assigned
        [G + M]): the gts are prepended as proposals assigned to themselves
        (mmdetection's add_gt_as_proposals), the proposals get MaxIoU 0.5 / [0, 0.5)."""
        G = gt_boxes.shape[0]
        assigned, _ = ops.max_iou_assign(proposals.float(), gt_boxes.float().reshape(1, G, 4),
                                         torch.tensor([G], device=proposals.device), pos_iou_thr=0.5,
                                         neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)
        boxes = torch.cat((gt_boxes.float(), proposals.float()))
        own = torch.arange(1, G + 1, device=proposals.device)
        return boxes, torch.cat((own, assigned[0]))

    def roi_forward(self, feats: list[torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rois [K, 5] (b, x1, y1, x2, y2) -> (pooled [K, C, 7, 7], class logits [K, K_cls + 1],
        deltas [K, 4] or [K, K_cls, 4])."""
        f = feats[:len(self.roi_align.strides)]
        dtype = f[0].dtype if f[0].dtype in (torch.float32, torch.float64) else torch.float32
        pooled = self.roi_align(f, rois.to(dtype))
        x = pooled.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        reg = self.fc_reg(x)
        if not self.reg_class_agnostic:
            reg = reg.view(reg.shape[0], -1, 4)
        return pooled, self.fc_cls(x), reg

    def _class_deltas(self, reg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """reg [K, 4] or [K, K_cls, 4], labels [K] in [0, K_cls) -> the deltas of the label [K, 4]."""
        if self.reg_class_agnostic:
            return reg
        return reg[torch.arange(reg.shape[0], device=reg.device), labels]

    # ---------------------------------------------------------------- training
    def forward(self, feats: list[torch.Tensor], targets: list[dict], image_sizes: torch.Tensor):
        """Training losses and positives; see common.py for the contract."""
        device = feats[0].device
        B = feats[0].shape[0]
        gt_boxes, gt_counts = pad_gts(targets, device)
        image_sizes = image_sizes.to(device)

        # RPN: assignment and sampling on all levels at once.
        logits, deltas = self.rpn_forward(feats)
        anchors, centers = self.anchors(feats)
        all_anchors, all_logits, all_deltas = torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1)
        assigned = self.rpn_assign(all_anchors, torch.cat(centers), gt_boxes, gt_counts, image_sizes)
        cls_in, cls_t, reg_in, reg_t = [], [], [], []
        for b in range(B):
            pos, neg = sample(assigned[b], self.rpn_num, self.rpn_pos_fraction)
            sel = torch.cat((pos, neg))
            cls_in.append(all_logits[b, sel])
            cls_t.append((torch.arange(sel.numel(), device=device) < pos.numel()).float())
            reg_in.append(all_deltas[b, pos])
            reg_t.append(self.rpn_coder.encode(all_anchors[pos].float(), gt_boxes[b, assigned[b, pos] - 1]))
        # mmdetection's avg_factor: the sampled anchors of the batch (on this process).
        n_rpn = max(sum(t.numel() for t in cls_t), 1)
        loss_rpn_cls = F.binary_cross_entropy_with_logits(torch.cat(cls_in).float(), torch.cat(cls_t),
                                                          reduction="sum") / n_rpn
        loss_rpn_bbox = (torch.cat(reg_in).float() - torch.cat(reg_t)).abs().sum() / n_rpn
        # Keep every RPN parameter in the graph (no sampled anchor / no positive).
        rpn_touch = touch(all_logits, all_deltas)

        # RoI head: proposals + gts, assignment, sampling (pos first, as mmdetection).
        props = self.proposals(logits, deltas, anchors, image_sizes, self.train_nms_pre)
        rois, labels, gts, n_pos, n_sel = [], [], [], [], []
        for b, t in enumerate(targets):
            g_boxes = gt_boxes[b, :len(t["boxes"])]
            boxes, a = self.roi_assign(props[b][0], g_boxes)
            pos, neg = sample(a, self.roi_num, self.roi_pos_fraction)
            sel = torch.cat((pos, neg))
            rois.append(torch.cat((boxes.new_full((sel.numel(), 1), b), boxes[sel]), 1))
            g_labels = t["labels"].to(device, torch.long)
            labels.append(torch.cat((g_labels[a[pos] - 1], g_labels.new_full((neg.numel(),), self.num_classes))))
            gts.append(g_boxes[a[pos] - 1])
            n_pos.append(pos.numel())
            n_sel.append(sel.numel())
        rois, labels = torch.cat(rois), torch.cat(labels)
        pooled, cls_logits, reg = self.roi_forward(feats, rois)

        n_roi = max(rois.shape[0], 1)  # mmdetection: both RoI losses over the sampled RoIs
        loss_cls = F.cross_entropy(cls_logits.float(), labels, reduction="sum") / n_roi
        is_pos = labels < self.num_classes
        pos_deltas = self._class_deltas(reg[is_pos], labels[is_pos]).float()
        # reg_decoded_bbox: the GIoU loss compares decoded boxes (not clipped) with the gts.
        pos_pred = self.roi_coder.decode(rois[is_pos, 1:], pos_deltas)
        giou = ops.generalized_box_iou_loss(pos_pred, torch.cat(gts), reduction="sum")
        loss_bbox = giou / n_roi
        roi_touch = touch(cls_logits, reg)

        losses = {"loss_rpn_cls": self.w_rpn_cls * loss_rpn_cls + rpn_touch,
                  "loss_rpn_bbox": self.w_rpn_bbox * loss_rpn_bbox + rpn_touch,
                  "loss_cls": self.w_cls * loss_cls + roi_touch,
                  "loss_bbox": self.w_bbox * loss_bbox + roi_touch}
        return losses, self._positives(rois, labels, gts, n_pos, n_sel, pooled)

    def _positives(self, rois, labels, gts, n_pos, n_sel, pooled) -> AuxPositives:
        """Split the sampled RoIs (per image: positives then negatives) into AuxPositives;
        the features are the RoIAlign bins' mean, as official Co-DETR (bbox_feats.mean)."""
        feats = pooled.mean((-2, -1))
        out = AuxPositives([], [], [], [], [], [])
        start = 0
        for P, n, g in zip(n_pos, n_sel, gts):
            box, feat = rois[start:start + n, 1:].detach(), feats[start:start + n]
            neg = random_subset(torch.arange(P, n, device=box.device), self.max_negatives)
            out.pos_boxes.append(box[:P])
            out.pos_labels.append(labels[start:start + P])
            out.pos_gt_boxes.append(g.detach())
            out.pos_feats.append(feat[:P])
            out.neg_boxes.append(box[neg])
            out.neg_feats.append(feat[neg])
            start += n
        return out

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, feats: list[torch.Tensor], image_sizes: torch.Tensor) -> list[dict]:
        """B dicts {"boxes" [N, 4], "scores" [N], "labels" [N]}: RPN proposals -> RoI head ->
        softmax scores > score_thr, boxes decoded and clipped, NMS within each class,
        the best max_per_img (mmdetection's multiclass_nms)."""
        image_sizes = image_sizes.to(feats[0].device)
        logits, deltas = self.rpn_forward(feats)
        anchors, _ = self.anchors(feats)
        props = self.proposals(logits, deltas, anchors, image_sizes, self.test_nms_pre)
        results = []
        for b, (boxes, _) in enumerate(props):
            rois = torch.cat((boxes.new_full((boxes.shape[0], 1), b), boxes), 1)
            _, cls_logits, reg = self.roi_forward(feats, rois)
            scores = cls_logits.float().softmax(-1)[:, :-1]  # [M, K_cls], background dropped
            reg = reg.float()
            if self.reg_class_agnostic:
                reg = reg[:, None, :]
            pred = self.roi_coder.decode(boxes[:, None, :], reg, image_sizes[b]).expand(-1, self.num_classes, 4)
            keep = scores > self.score_thr
            pred, scores, cls = pred[keep], scores[keep], torch.nonzero(keep)[:, 1]
            order = ops.batched_nms(pred, scores, cls, self.nms_iou)[:self.max_per_img]
            results.append({"boxes": pred[order], "scores": scores[order], "labels": cls[order]})
        return results
