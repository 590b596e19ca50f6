"""Deterministic synthetic COCO-format detection data: coloured shapes on textured backgrounds.

Small enough to train on a CPU in minutes, hard enough not to be trivial: textured
backgrounds (gradient + stripes + noise), random colours, object sizes from ~8 px to half the
image, overlaps, 1..max_objects objects per image. Every image has its own RNG stream seeded
from (seed, split, index), so the output depends only on the arguments: the same call gives a
byte-identical json and identical pixels.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASSES = ("rectangle", "ellipse", "triangle", "cross", "ring")
GENERATOR_VERSION = 1
ANN_NAME = "annotations.json"


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float [H, W, 3]: a linear colour gradient at a random angle plus random stripes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(0, 4)):  # 0..3 stripe patterns
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(6, 64)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period + phase)
        img += wave[..., None] * rng.uniform(-35, 35, 3)
    return img


def _shape_mask(cls: str, h: int, w: int, box: tuple[int, int, int, int],
                rng: np.random.Generator) -> np.ndarray:
    """bool [H, W] mask of one shape drawn inside the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    if cls == "rectangle":
        d.rectangle(box, fill=255)
    elif cls == "ellipse":
        d.ellipse(box, fill=255)
    elif cls == "triangle":
        xm = (x0 + x1) / 2
        if rng.random() < 0.5:  # apex up or down
            d.polygon([(x0, y1), (x1, y1), (xm, y0)], fill=255)
        else:
            d.polygon([(x0, y0), (x1, y0), (xm, y1)], fill=255)
    elif cls == "cross":
        t = max(2, round(0.3 * min(bw, bh)))
        yc, xc = y0 + (bh - t) // 2, x0 + (bw - t) // 2
        d.rectangle((x0, yc, x1, yc + t - 1), fill=255)
        d.rectangle((xc, y0, xc + t - 1, y1), fill=255)
    elif cls == "ring":
        d.ellipse(box, outline=255, width=max(2, round(0.2 * min(bw, bh))))
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    return np.asarray(m) > 0


def _render_image(rng: np.random.Generator, h: int, w: int, max_objects: int,
                  min_size: int, max_size: int):
    """Returns (uint8 [H, W, 3], [(class index, mask bool [H, W]), ...])."""
    canvas = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int64)  # which object is visible at each pixel
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            k = int(rng.integers(len(CLASSES)))
            side = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            bw = int(np.clip(round(side * math.sqrt(aspect)), min_size, w))
            bh = int(np.clip(round(side / math.sqrt(aspect)), min_size, h))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            mask = _shape_mask(CLASSES[k], h, w, (x0, y0, x0 + bw - 1, y0 + bh - 1), rng)
            # Overlaps are allowed, but keep at least half of every earlier object visible,
            # otherwise its box would label mostly someone else's pixels.
            ok = all(((owner == j) & ~mask).sum() >= 0.5 * m.sum() for j, (_, m) in enumerate(objects))
            if ok:
                break
        else:
            continue
        bg_mean = canvas[mask].mean(0)
        for _c in range(10):  # a colour that stands out from the local background
            colour = rng.uniform(0, 255, 3)
            if np.abs(colour - bg_mean).sum() > 120:
                break
        canvas[mask] = colour
        owner[mask] = len(objects)
        objects.append((k, mask))
    canvas += rng.normal(0, rng.uniform(2, 12), canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def generate_synthetic_coco(out_dir: str | Path, num_images: int,
                            image_size: tuple[int, int] = (256, 256), seed: int = 0,
                            max_objects: int = 8, min_size: int = 8,
                            max_size: Optional[int] = None, split: str = "train", progress: bool = False) -> Path:
    """Write ``num_images`` PNGs to ``out_dir/images`` and a COCO instances json
    ``out_dir/annotations.json`` (returned). Boxes are the tight pixel extent of each shape
    (xywh, amodal: occluded parts included); ``area`` is the shape's pixel count; category
    ids are 1..len(CLASSES). ``max_size`` defaults to half the shorter image side.
    ``progress`` shows a progress bar.
    """
    out_dir = Path(out_dir)
    h, w = int(image_size[0]), int(image_size[1])
    max_size = int(max_size if max_size is not None else min(h, w) // 2)
    if not 0 < min_size <= max_size <= min(h, w):
        raise ValueError(f"need 0 < min_size <= max_size <= min(image_size), got {min_size}, {max_size}, {image_size}")
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    split_code = zlib.crc32(split.encode())  # stable across runs, unlike hash()

    images, annotations = [], []
    for idx in tqdm(range(num_images), desc=f"generate {split}", disable=not progress, dynamic_ncols=True):
        rng = np.random.default_rng([seed, split_code, idx])
        pixels, objects = _render_image(rng, h, w, max_objects, min_size, max_size)
        img_id, name = idx + 1, f"{idx + 1:06d}.png"
        Image.fromarray(pixels, "RGB").save(img_dir / name, format="PNG")
        images.append({"id": img_id, "file_name": name, "width": w, "height": h})
        for k, mask in objects:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": k + 1,
                                "bbox": bbox, "area": float(mask.sum()), "iscrowd": 0})
    data = {
        "info": _info(num_images, (h, w), seed, max_objects, min_size, max_size, split),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    ann_file = out_dir / ANN_NAME
    tmp = ann_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, ann_file)  # the json appears last and whole: its presence means "complete"
    return ann_file


def _info(num_images, image_size, seed, max_objects, min_size, max_size, split) -> dict:
    return {"description": "codetr synthetic shapes", "generator_version": GENERATOR_VERSION,
            "num_images": num_images, "image_size": list(image_size), "seed": seed,
            "max_objects": max_objects, "min_size": min_size, "max_size": max_size, "split": split}


def ensure_synthetic_dataset(root: str | Path, num_train: int = 200, num_val: int = 50,
                             image_size: tuple[int, int] = (256, 256), seed: int = 0,
                             max_objects: int = 8, min_size: int = 8,
                             max_size: Optional[int] = None, progress: bool = False) -> dict[str, dict[str, Path]]:
    """Generate ``root/{train,val}`` once; reuse them when an existing json was made with the
    same parameters and all its images exist.

    Returns ``{"train": {"images_dir": Path, "ann_file": Path}, "val": {...}}``, so
    ``CocoDetection(**splits["train"])`` works.
    """
    root = Path(root)
    h, w = int(image_size[0]), int(image_size[1])
    ms = int(max_size if max_size is not None else min(h, w) // 2)
    out = {}
    for split, n in (("train", num_train), ("val", num_val)):
        d = root / split
        want = _info(n, (h, w), seed, max_objects, min_size, ms, split)
        if not _is_complete(d, want):
            generate_synthetic_coco(d, n, (h, w), seed, max_objects, min_size, ms, split, progress)
        out[split] = {"images_dir": d / "images", "ann_file": d / ANN_NAME}
    return out


def _is_complete(d: Path, want_info: dict) -> bool:
    try:
        data = json.loads((d / ANN_NAME).read_text())
    except (OSError, ValueError):
        return False
    if data.get("info") != want_info:
        return False
    return all((d / "images" / im["file_name"]).is_file() for im in data.get("images", []))
