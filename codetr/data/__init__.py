"""Data: COCO-json dataset, DETR-style transforms, padding collate, synthetic generator."""

from .coco import CocoDetection, load_coco_json
from .collate import collate
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import ensure_synthetic_dataset, generate_synthetic_coco
from .transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    make_coco_transforms,
)

__all__ = [
    "CocoDetection",
    "load_coco_json",
    "collate",
    "SYNTHETIC_CLASSES",
    "ensure_synthetic_dataset",
    "generate_synthetic_coco",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ToTensor",
    "make_coco_transforms",
]
