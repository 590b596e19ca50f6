"""One-to-one Hungarian matching of predictions to ground truth (DETR)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.ops import box_iou


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """logits [Q, C], labels [G] -> [Q, G]: the focal loss of predicting the gt class as
    positive minus that of predicting it as negative (Deformable DETR's class cost)."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + eps).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + eps).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU),
    minimised per image with ``scipy.optimize.linear_sum_assignment``.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        alpha, gamma: focal cost parameters.

    Costs are computed in fp32 even under autocast: bf16 sigmoid/log and box areas are too
    coarse to rank near-equal candidates, and a non-finite cost would make the assignment
    meaningless (it raises instead).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    gt_boxes: torch.Tensor) -> torch.Tensor:
        """logits [Q, C], boxes [Q, 4] cxcywh, labels [G], gt_boxes [G, 4] cxcywh -> [Q, G] fp32."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
            c_cls = focal_class_cost(logits, labels, self.alpha, self.gamma)
            c_l1 = torch.cdist(boxes, gt_boxes, p=1)
            c_giou = -box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes), mode="giou")
            return self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: {"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4] cxcywh normalised}.
            targets: B dicts with "labels" [G_b] int64 and "boxes" [G_b, 4] cxcywh normalised.
        Returns:
            B pairs (query indices [K_b], target indices [K_b]) int64, K_b = min(Q, G_b),
            sorted by query index.
        """
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            c = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"])
            if not torch.isfinite(c).all():
                raise ValueError(f"HungarianMatcher: non-finite matching cost for image {b} "
                                 "(NaN/inf in predicted logits or boxes, or degenerate target boxes)")
            rows, cols = linear_sum_assignment(c.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
