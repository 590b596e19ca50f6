"""Inference on images: ``Predictor.from_checkpoint(path).predict(image)``, and drawing."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from codetr.config import build_model, config_from_dict
from codetr.data import collate

from .checkpoint import load_checkpoint, load_model_state
from .data import make_transforms

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def load_trained(path: Union[str, Path]) -> tuple[torch.nn.Module, dict]:
    """(inference model in eval mode, with ``.config``; the checkpoint dict) from a training
    checkpoint. ValueError when the file is not a codetr training checkpoint."""
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or "class_names" not in ckpt:
        state = ckpt.get("state_dict", ckpt)
        if isinstance(state, dict) and any(str(k).startswith("query_head.") for k in state):
            raise ValueError(f"{path} is an official Co-DETR checkpoint: convert it first "
                             f"(codetr convert {path} OUT.pt --from official)")
        raise ValueError(f"{path} is not a codetr training checkpoint (no model_config)")
    cfg = config_from_dict(ckpt["model_config"])
    cfg.backbone.pretrained = False  # the checkpoint holds the weights
    model = build_model(cfg, len(ckpt["class_names"]))
    load_model_state(model, ckpt["model"], source=str(path))
    return model.inference_model().eval(), ckpt


class Predictor:
    """A trained detector (auxiliary branches dropped) with its eval transform.

    ``predict(image)`` takes a path, a PIL image or an HxWx3 uint8 array (RGB) and returns
    {"boxes" [N, 4] xyxy pixels of the original image, "scores" [N], "labels" [N] int64,
    "class_names": list of N names}, best first, scores >= min_score. Given a list, it
    returns one such dict per image, running ``batch_size`` images at a time (padded to the
    largest, as in evaluation).

    ``model`` is an eager inference model, an ``ExportedDetector`` (codetr.export) or a
    ``TestTimeAugmentation`` over either: anything called as
    ``model(images [B, 3, H, W], masks [B, H, W], orig_sizes=[B, 2]) -> B dicts``.

    Padding: a model with our variants ``batch_invariant=True`` and
    ``encoder_head="agnostic"`` gives the same detections alone or in a batch
    (tests/engine/test_predictor.py). In the official architecture a larger batch partner's
    padding reaches the backbone and neck features, and the padded tokens are ranked in the
    two-stage selection, as in the official batched evaluation; batch_size=1 avoids both.
    """

    def __init__(self, model, class_names: list[str], transform, device="cpu", min_score: float = 0.0,
                 batch_size: int = 1, size_divisibility: int = 1, config=None):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.model = model.to(device).eval() if isinstance(model, torch.nn.Module) else model.eval()
        self.class_names, self.transform = class_names, transform
        self.device, self.min_score = torch.device(device), min_score
        self.batch_size, self.size_divisibility = batch_size, size_divisibility
        self.config = config  # the model's DetectorConfig, when known

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device="cpu", min_score: float = 0.0, batch_size: int = 1,
                        tta=None) -> "Predictor":
        """A training checkpoint (.pt), or an exported model (.onnx, .pt2: ``codetr export``).
        ``tta``: a dict of ``TestTimeAugmentation`` options (e.g. {"scales": (0.8, 1, 1.2)}),
        or None for none."""
        from .tta import TestTimeAugmentation

        if Path(path).suffix in (".onnx", ".pt2"):
            from codetr.export import ExportedDetector

            model = ExportedDetector(path, device)
            config, class_names = model.config, model.class_names
        else:
            model, ckpt = load_trained(path)
            config, class_names = model.config, list(ckpt["class_names"])
        divisibility = config.data.size_divisibility
        if tta is not None:
            model = TestTimeAugmentation(model, size_divisibility=divisibility, **tta)
        return cls(model, class_names, make_transforms(config.data, train=False), device, min_score,
                   batch_size, divisibility, config)

    @staticmethod
    def load_image(image: ImageLike) -> Image.Image:
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path}")
            try:
                with Image.open(path) as im:
                    return im.convert("RGB")
            except Exception as e:  # PIL.UnidentifiedImageError and truncated files
                raise ValueError(f"cannot decode image {path}: {e}") from e
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image: expected an HxWx3 uint8 RGB array, got {image.shape} {image.dtype}")
            return Image.fromarray(image)
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        raise TypeError(f"image: expected a path, a PIL image or an array, got {type(image).__name__}")

    @torch.no_grad()
    def predict(self, images: Union[ImageLike, Sequence[ImageLike]], progress: bool = False):
        """One image -> one dict; a list (or tuple) of images -> a list of dicts (see the class
        docstring). ``progress`` shows a progress bar over the batches."""
        if isinstance(images, (list, tuple)):
            return list(self.predict_iter(images, progress))
        return next(self.predict_iter([images]))

    def predict_iter(self, images: Sequence[ImageLike], progress: bool = False) -> Iterator[dict]:
        """The detections of each image in order, ``batch_size`` images at a time."""
        bar = tqdm(total=len(images), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
        with bar, torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                pils = [self.load_image(im) for im in images[start : start + self.batch_size]]
                x, masks, _ = collate([self.transform(pil, None) for pil in pils], self.size_divisibility)
                orig = torch.tensor([[pil.height, pil.width] for pil in pils], device=self.device)
                for out in self.model(x.to(self.device), masks.to(self.device), orig_sizes=orig):
                    keep = out["scores"] >= self.min_score
                    out = {k: v[keep].cpu() for k, v in out.items()}
                    out["class_names"] = [self.class_names[i] for i in out["labels"].tolist()]
                    yield out
                bar.update(len(pils))


def draw_detections(image: Image.Image, detections: dict) -> Image.Image:
    """A copy of ``image`` with each box drawn and labelled "name score" ("name" when
    ``detections`` has no scores: ground truth)."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    scores = detections["scores"].tolist() if "scores" in detections else [None] * len(detections["labels"])
    for box, score, label, name in zip(detections["boxes"].tolist(), scores,
                                       detections["labels"].tolist(), detections["class_names"]):
        color = palette[label % len(palette)]
        draw.rectangle(box, outline=color, width=2)
        draw.text((box[0] + 2, box[1] + 1), name if score is None else f"{name} {score:.2f}", fill=color)
    return image
