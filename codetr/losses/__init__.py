"""Losses: focal, L1 and the DETR set criterion (GIoU is codetr.ops.generalized_box_iou_loss)."""
from .criterion import SetCriterion
from .focal import sigmoid_focal_loss

__all__ = ["SetCriterion", "sigmoid_focal_loss"]
