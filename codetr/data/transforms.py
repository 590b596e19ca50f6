"""Detection transforms on (image, target) pairs, following DETR's policy.

An image is a ``PIL.Image`` (before :class:`ToTensor`) or a float tensor ``[3, H, W]``.
A target is a dict; ``boxes`` is a float tensor ``[G, 4]`` in absolute-pixel xyxy
coordinates of the *current* image, and every other per-box entry (``labels``,
``iscrowd``, ``area``) is a tensor with leading dim ``G`` that is filtered alongside.
``size`` is kept up to date as a ``(h, w)`` int64 tensor.

Boxes are never normalised here: the model normalises by the image size it sees.
Randomness comes from torch's global RNG, so ``torch.manual_seed`` (and DataLoader
worker seeding) makes a policy reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PER_BOX_KEYS = ("boxes", "labels", "iscrowd", "area")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_size(image) -> tuple[int, int]:
    """(h, w) of a PIL image or a ``[..., H, W]`` tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _set_size(target: Optional[dict], h: int, w: int) -> Optional[dict]:
    if target is not None:
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
    return target


def _filter_boxes(target: dict, keep: torch.Tensor) -> dict:
    for k in PER_BOX_KEYS:
        if k in target:
            target[k] = target[k][keep]
    return target


# ----------------------------------------------------------------------------- functional


def hflip(image, target: Optional[dict]):
    """Mirror left-right: x -> w - x, so [x1, y1, x2, y2] -> [w - x2, y1, w - x1, y2]."""
    h, w = image_size(image)
    if isinstance(image, Image.Image):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        image = image.flip(-1)
    if target is not None and "boxes" in target:
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return image, target


def crop(image, target: Optional[dict], region: tuple[int, int, int, int]):
    """Crop ``region = (top, left, height, width)``; boxes are shifted, clipped to the crop,
    and boxes left with zero area are removed (with their labels)."""
    top, left, ch, cw = region
    if isinstance(image, Image.Image):
        image = image.crop((left, top, left + cw, top + ch))
    else:
        image = image[..., top : top + ch, left : left + cw]
    if target is not None:
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
            b[:, 0::2] = b[:, 0::2].clamp(0, cw)
            b[:, 1::2] = b[:, 1::2].clamp(0, ch)
            target["boxes"] = b
            if "area" in target:
                target["area"] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            target = _filter_boxes(target, keep)
        _set_size(target, ch, cw)
    return image, target


def get_size_with_aspect_ratio(hw: tuple[int, int], size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """Output (h, w) with short side ``size`` and the aspect ratio kept, shrinking ``size`` so
    the long side stays <= ``max_size`` (DETR semantics, except the shrunken short side is
    floored rather than rounded so the long side never exceeds ``max_size``)."""
    h, w = hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(math.floor(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target: Optional[dict], size: int | tuple[int, int], max_size: Optional[int] = None):
    """Resize to short side ``size`` (int, aspect kept, see :func:`get_size_with_aspect_ratio`)
    or to exactly ``size = (h, w)``; boxes are scaled by the per-axis ratios."""
    h, w = image_size(image)
    oh, ow = size if isinstance(size, (tuple, list)) else get_size_with_aspect_ratio((h, w), size, max_size)
    if (oh, ow) != (h, w):
        if isinstance(image, Image.Image):
            image = image.resize((ow, oh), Image.Resampling.BILINEAR)
        else:
            image = F.interpolate(image[None].float(), size=(oh, ow), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
    if target is not None:
        target = dict(target)
        rw, rh = ow / w, oh / h
        if "boxes" in target:
            target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=target["boxes"].dtype)
        if "area" in target:
            target["area"] = target["area"] * (rw * rh)
        _set_size(target, oh, ow)
    return image, target


# ----------------------------------------------------------------------------- classes


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target=None):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to a size drawn uniformly from ``scales`` (aspect ratio kept,
    long side capped at ``max_size``): DETR's multi-scale training."""

    def __init__(self, scales: Sequence[int], max_size: Optional[int] = None):
        self.scales = list(scales)
        self.max_size = max_size

    def __call__(self, image, target=None):
        size = self.scales[int(torch.randint(len(self.scales), ()).item())]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(scales={self.scales}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose sides are drawn uniformly in [min_size, min(max_size, side)]
    at a uniformly random position (sides shorter than ``min_size`` are kept whole)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target=None):
        h, w = image_size(image)
        ch = _randint(min(self.min_size, h), min(self.max_size, h))
        cw = _randint(min(self.min_size, w), min(self.max_size, w))
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        return crop(image, target, (top, left, ch, cw))

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, ()).item())


class RandomSelect:
    """Apply ``a`` with probability ``p``, otherwise ``b``."""

    def __init__(self, a: Callable, b: Callable, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image, target=None):
        if torch.rand(()).item() < self.p:
            return self.a(image, target)
        return self.b(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect(p={self.p},\n  a={self.a!r},\n  b={self.b!r})"


class ToTensor:
    """PIL RGB image -> float32 tensor [3, H, W] in [0, 1]; tensors are cast to float32."""

    def __call__(self, image, target=None):
        if isinstance(image, Image.Image):
            arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
            image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        else:
            image = image.float()
        return image, target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Per-channel (x - mean) / std on a [3, H, W] tensor. Boxes are left in absolute pixels."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor, target=None):
        return (image - self.mean) / self.std, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def make_coco_transforms(
    train: bool,
    scales: Sequence[int] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    crop_sizes: tuple[int, int] = (384, 600),
    resize_before_crop: Sequence[int] = (400, 500, 600),
) -> Compose:
    """DETR's COCO policy.

    train: flip(0.5), then with p=0.5 a multi-scale resize, otherwise resize to
    ``resize_before_crop`` -> random crop with sides in ``crop_sizes`` -> multi-scale resize;
    then ToTensor + ImageNet Normalize.
    eval: resize the short side to ``max(scales)`` (long side <= max_size), ToTensor, Normalize.
    """
    tail = [ToTensor(), Normalize()]
    if not train:
        return Compose([RandomResize([max(scales)], max_size=max_size), *tail])
    return Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(
            RandomResize(scales, max_size=max_size),
            Compose([
                RandomResize(resize_before_crop),
                RandomSizeCrop(*crop_sizes),
                RandomResize(scales, max_size=max_size),
            ]),
        ),
        *tail,
    ])
