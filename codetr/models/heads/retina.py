"""RetinaNet auxiliary head (Lin et al. 2017), mmdetection's RetinaHead with Co-DETR's light
towers: 9 anchors per cell (3 scales x 3 ratios), max-IoU assignment 0.5 / 0.4, focal loss
and GIoU on the decoded positive boxes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ... import ops
from .anchor_head import AnchorHead, conv_tower
from .common import DEFAULT_STRIDES

# A zero-area box far outside every image: its IoU with any gt is 0, so it stands in for
# a padding anchor in the batched max-IoU assignment without winning any gt.
_NOWHERE = -1.0e4


class RetinaHead(AnchorHead):
    """RetinaNet head on the adapter levels.

    Args:
        num_classes, in_channels, strides: the head contract (common.py).
        feat_channels: tower width (default in_channels).
        stacked_convs: conv + ReLU per tower (mmdetection: 4; Co-DETR keeps towers light: 1).
        octave_base_scale, scales_per_octave, ratios: anchors of sizes
            octave_base_scale * 2 ** (i / scales_per_octave) strides, ratios h / w.
        pos_iou_thr, neg_iou_thr, min_pos_iou: the max-IoU assigner (low-quality matches on,
            every prior reaching a gt's best IoU).
        loss_cls_weight, loss_bbox_weight: focal 1, GIoU 2.
        max_negatives, nms_pre, score_thr, nms_iou, max_per_img: see AnchorHead.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, strides: Sequence[int] = DEFAULT_STRIDES,
                 feat_channels: Optional[int] = None, stacked_convs: int = 1, octave_base_scale: float = 4.0,
                 scales_per_octave: int = 3, ratios: Sequence[float] = (0.5, 1.0, 2.0), pos_iou_thr: float = 0.5,
                 neg_iou_thr: float = 0.4, min_pos_iou: float = 0.0, loss_cls_weight: float = 1.0,
                 loss_bbox_weight: float = 2.0, max_negatives: int = 300, nms_pre: int = 1000,
                 score_thr: float = 0.05, nms_iou: float = 0.5, max_per_img: int = 100):
        base_sizes = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        super().__init__(num_classes, in_channels, strides, base_sizes=base_sizes, ratios=ratios,
                         bbox_stds=(1.0, 1.0, 1.0, 1.0), max_negatives=max_negatives, nms_pre=nms_pre,
                         score_thr=score_thr, nms_iou=nms_iou, max_per_img=max_per_img)
        feat_channels = feat_channels or in_channels
        self.pos_iou_thr, self.neg_iou_thr, self.min_pos_iou = pos_iou_thr, neg_iou_thr, min_pos_iou
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        A = self.num_anchors
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm=False)
        self.reg_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm=False)
        self.retina_cls = nn.Conv2d(feat_channels, A * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, A * 4, 3, padding=1)
        self.init_weights(self.retina_cls, [self.retina_reg], [self.cls_convs, self.reg_convs])

    def level_outputs(self, feat: torch.Tensor, level: int):
        """(cls [B, A * C, H, W], deltas [B, A * 4, H, W])."""
        return self.retina_cls(self.cls_convs(feat)), self.retina_reg(self.reg_convs(feat))

    def assign(self, anchors, num_per_level, valid, gt_boxes, gt_counts):
        """Max-IoU assignment on each image's valid anchors (mmdetection drops the anchors
        outside the image before assigning, so a gt's low-quality match is its best valid
        anchor): the padding anchors of image b are moved out of reach, then ignored (-1)."""
        priors = torch.where(valid[..., None], anchors[None], anchors.new_full((4,), _NOWHERE))
        assigned, _ = ops.max_iou_assign(priors, gt_boxes, gt_counts, self.pos_iou_thr, self.neg_iou_thr,
                                         self.min_pos_iou, match_low_quality=True, gt_max_assign_all=True)
        return assigned.masked_fill(~valid, -1)

    def losses(self, anchors, outputs, assigned, gt_boxes, gt_labels):
        """mmdetection's AnchorHead.loss (decoded boxes): cls [B, N, C], deltas [B, N, 4];
        assigned [B, N]. Focal over the valid, non-ignored anchors, GIoU over the positives,
        both normalised by the number of positives."""
        cls, deltas = outputs
        loss_cls, (b_idx, a_idx, gt_idx), num_pos = self.classification_loss(cls, assigned, gt_labels)
        decoded = self.coder.decode(anchors[a_idx], deltas[b_idx, a_idx])
        loss_bbox = ops.generalized_box_iou_loss(decoded, gt_boxes[b_idx, gt_idx]).sum() / num_pos
        return {"loss_cls": self.loss_cls_weight * loss_cls, "loss_bbox": self.loss_bbox_weight * loss_bbox}



__all__ = ["RetinaHead"]
