"""COCO-json detection dataset (boxes only) read through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from .transforms import ToTensor


def load_coco_json(ann_file: str | Path) -> COCO:
    """Load a COCO instances json into a pycocotools ``COCO`` (quietly).

    Raises FileNotFoundError if the file is missing and ValueError (naming the file) if it is
    not valid json or lacks the ``images`` / ``categories`` lists.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed COCO json {ann_file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"malformed COCO json {ann_file}: top level is not an object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"malformed COCO json {ann_file}: missing list '{key}'")
    data.setdefault("annotations", [])  # image-info-only files (e.g. test splits) are fine
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Detection dataset over a COCO instances json.

    Args:
        images_dir: folder holding the ``file_name`` of each json image.
        ann_file: COCO instances json.
        transforms: callable ``(image, target) -> (image, target)`` (see ``transforms.py``);
            None means ToTensor only.
        train: if True, crowd regions (iscrowd=1) are left out of the targets (they are not
            objects to match); if False they are kept, flagged by ``target["iscrowd"]``.

    Labels are contiguous 0..C-1 in increasing category-id order (``cat_id_to_label``,
    ``label_to_cat_id``, ``class_names``). Images without annotations are kept. Boxes are
    clipped to the image; boxes with no area left (w <= 0, h <= 0, or outside the image) are
    dropped, with one warning giving their count.

    ``dataset[i]`` -> ``(image, target)``: image float ``[3, H, W]`` after transforms; target
        boxes     float32 [G, 4]  xyxy absolute pixels of the transformed image
        labels    int64   [G]     contiguous labels
        iscrowd   int64   [G]     all zero when train=True
        image_id  int             COCO image id
        orig_size int64   [2]     (h, w) of the decoded image
        size      int64   [2]     (h, w) after transforms
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path,
                 transforms: Optional[Callable] = None, train: bool = True):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms if transforms is not None else ToTensor()
        self.train = train
        self.coco = load_coco_json(self.ann_file)

        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat_id: dict[int, int] = {i: c["id"] for i, c in enumerate(cats)}
        self.cat_id_to_label: dict[int, int] = {c["id"]: i for i, c in enumerate(cats)}
        self.class_names: list[str] = [c["name"] for c in cats]
        self.ids: list[int] = sorted(self.coco.imgs)

        # Targets are prepared once, so invalid boxes are counted (and warned about) once.
        self._targets = {}
        dropped = 0
        for img_id in self.ids:
            boxes, labels, crowd, n_bad = self._prepare(img_id)
            self._targets[img_id] = (boxes, labels, crowd)
            dropped += n_bad
        if dropped:
            warnings.warn(f"{self.ann_file}: dropped {dropped} invalid boxes "
                          "(zero width/height or outside the image)", stacklevel=2)

    def _prepare(self, img_id: int):
        info = self.coco.imgs[img_id]
        w, h = float(info["width"]), float(info["height"])
        anns = self.coco.imgToAnns.get(img_id, [])
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        # Clipping is monotone, so a box with w <= 0 or h <= 0 stays empty, as does one lying
        # outside the image: a single positive-area test catches every invalid case.
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=np.int64)
        return boxes[valid].astype(np.float32), labels[valid], crowd[valid], int((~valid).sum())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, img_id: int) -> Image.Image:
        path = self.images_dir / self.coco.imgs[img_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (image id {img_id} in {self.ann_file})")
        with Image.open(path) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        image = self.load_image(img_id)
        boxes, labels, crowd = self._targets[img_id]
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "iscrowd": torch.from_numpy(crowd.copy()),
            "image_id": img_id,
            "orig_size": size,
            "size": size.clone(),
        }
        return self.transforms(image, target)
