"""Co-DETR's ATSS auxiliary head (Zhang et al. 2020), mmdetection's ATSSHead with Co-DETR's
settings: one conv + GroupNorm per tower, one square anchor of side 8 x stride per cell,
ATSS assignment (topk 9), focal + centerness-weighted GIoU + centerness BCE losses.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from .anchor_head import AnchorHead, Scale, conv_tower
from .common import reduce_mean
from .common import DEFAULT_STRIDES


def centerness_target(anchors: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
    """anchors, gts [P, 4] xyxy -> [P]: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
    of the anchor centre's distances (l, t, r, b) to the sides of its gt (FCOS' centerness,
    mmdetection's ATSSHead.centerness_target). The centres of positives lie inside the gt."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack((cx - gts[:, 0], gts[:, 2] - cx), 1)
    tb = torch.stack((cy - gts[:, 1], gts[:, 3] - cy), 1)
    return torch.sqrt(lr.min(1).values / lr.max(1).values * (tb.min(1).values / tb.max(1).values))


class ATSSHead(AnchorHead):
    """ATSS head on the adapter levels.

    Args:
        num_classes, in_channels, strides: the head contract (common.py).
        feat_channels: tower width (default in_channels).
        stacked_convs: convs per tower (Co-DETR: 1; mmdetection's ATSS: 4).
        octave_base_scale: anchor side in strides (one square anchor per cell).
        topk: ATSS candidates per level and gt.
        loss_cls_weight, loss_bbox_weight, loss_centerness_weight: mmdetection's ATSS
            weights (1, 2, 1); Co-DETR's 12x factor is applied by the detector.
        max_negatives, nms_pre, score_thr, nms_iou, max_per_img: see AnchorHead (the
            official test_cfg: score_thr 0.0, NMS 0.6).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, strides: Sequence[int] = DEFAULT_STRIDES,
                 feat_channels: Optional[int] = None, stacked_convs: int = 1, octave_base_scale: float = 8.0,
                 topk: int = 9, loss_cls_weight: float = 1.0, loss_bbox_weight: float = 2.0,
                 loss_centerness_weight: float = 1.0, max_negatives: int = 300, nms_pre: int = 1000,
                 score_thr: float = 0.0, nms_iou: float = 0.6, max_per_img: int = 100):
        super().__init__(num_classes, in_channels, strides, base_sizes=(octave_base_scale,), ratios=(1.0,),
                         bbox_stds=(0.1, 0.1, 0.2, 0.2), max_negatives=max_negatives, nms_pre=nms_pre,
                         score_thr=score_thr, nms_iou=nms_iou, max_per_img=max_per_img)
        feat_channels = feat_channels or in_channels
        self.topk = topk
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.loss_centerness_weight = loss_centerness_weight
        A = self.num_anchors
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm=True)
        self.reg_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm=True)
        self.atss_cls = nn.Conv2d(feat_channels, A * num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, A * 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, A * 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.init_weights(self.atss_cls, [self.atss_reg, self.atss_centerness], [self.cls_convs, self.reg_convs])

    def level_outputs(self, feat: torch.Tensor, level: int):
        """(cls [B, A * C, H, W], deltas [B, A * 4, H, W], centerness [B, A, H, W])."""
        cls_feat, reg_feat = self.cls_convs(feat), self.reg_convs(feat)
        return (self.atss_cls(cls_feat), self.scales[level](self.atss_reg(reg_feat)),
                self.atss_centerness(reg_feat))

    def assign(self, anchors, num_per_level, valid, gt_boxes, gt_counts):
        """ATSS per image on the image's valid anchors only, as mmdetection removes the
        anchors outside the image before assigning: padding anchors are never candidates,
        so they change neither a gt's top-k nor its IoU threshold. Padding anchors: -1."""
        B, N = valid.shape
        assigned = torch.full((B, N), -1, dtype=torch.long, device=anchors.device)
        for b in range(B):
            idx = torch.nonzero(valid[b]).squeeze(1)
            counts = torch.stack([v.sum() for v in valid[b].split(num_per_level)]).tolist()
            a, _ = ops.atss_assign(anchors[idx], counts, gt_boxes[b:b + 1], gt_counts[b:b + 1], self.topk)
            assigned[b, idx] = a[0]
        return assigned

    def losses(self, anchors, outputs, assigned, gt_boxes, gt_labels):
        """mmdetection's ATSSHead.loss on the flattened outputs: cls [B, N, C], deltas
        [B, N, 4], centerness [B, N, 1]; assigned [B, N]."""
        cls, deltas, centerness = outputs
        loss_cls, (b_idx, a_idx, gt_idx), num_pos = self.classification_loss(cls, assigned, gt_labels)

        pos_anchors, pos_gts = anchors[a_idx], gt_boxes[b_idx, gt_idx]
        ctr_targets = centerness_target(pos_anchors, pos_gts)
        decoded = self.coder.decode(pos_anchors, deltas[b_idx, a_idx])
        # The GIoU of each positive weighted by its centerness target and normalised by their
        # sum: well-centred anchors dominate the box loss.
        ctr_sum = max(float(reduce_mean(ctr_targets.sum())), 1.0)
        loss_bbox = (ops.generalized_box_iou_loss(decoded, pos_gts) * ctr_targets).sum() / ctr_sum
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[b_idx, a_idx, 0], ctr_targets,
                                                      reduction="sum") / num_pos
        return {"loss_cls": self.loss_cls_weight * loss_cls, "loss_bbox": self.loss_bbox_weight * loss_bbox,
                "loss_centerness": self.loss_centerness_weight * loss_ctr}

    def score_factors(self, outputs):
        return outputs[2][..., 0].sigmoid()



__all__ = ["ATSSHead", "centerness_target"]
