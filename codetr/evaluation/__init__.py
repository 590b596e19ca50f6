"""Evaluation: COCO box AP via pycocotools."""

from .coco_eval import STAT_NAMES, CocoEvaluator

__all__ = ["CocoEvaluator", "STAT_NAMES"]
