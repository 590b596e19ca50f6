"""Losses: focal, L1, GIoU and the DETR set criterion."""
from .criterion import SetCriterion
from .focal import sigmoid_focal_loss
from .giou import generalized_box_iou, generalized_box_iou_loss

__all__ = ["SetCriterion", "sigmoid_focal_loss", "generalized_box_iou", "generalized_box_iou_loss"]
