"""Inference on images: ``Predictor.from_checkpoint(path).predict(image)``, and drawing."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from codetr.config import build_model, config_from_dict

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
    "class_names": list of N names}, best first, scores >= min_score.
    """

    def __init__(self, model: torch.nn.Module, class_names: list[str], transform, device="cpu",
                 min_score: float = 0.0):
        self.model = model.to(device).eval()
        self.class_names, self.transform = class_names, transform
        self.device, self.min_score = torch.device(device), min_score

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device="cpu", min_score: float = 0.0) -> "Predictor":
        model, ckpt = load_trained(path)
        return cls(model, list(ckpt["class_names"]), make_transforms(model.config.data, train=False), device,
                   min_score)

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
    def predict(self, image: ImageLike) -> dict:
        pil = self.load_image(image)
        x, _ = self.transform(pil, None)
        masks = torch.zeros(1, *x.shape[-2:], dtype=torch.bool, device=self.device)
        out = self.model(x[None].to(self.device), masks,
                         orig_sizes=torch.tensor([[pil.height, pil.width]], device=self.device))[0]
        keep = out["scores"] >= self.min_score
        out = {k: v[keep].cpu() for k, v in out.items()}
        out["class_names"] = [self.class_names[i] for i in out["labels"].tolist()]
        return out


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
