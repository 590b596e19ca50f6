"""Encoder feature discriminability (Co-DETR, Fig. 2-3): does the encoder respond more
strongly on objects than on background?

Score map of one image, from the encoder memory (the encoder's output tokens):

1. per level l and location, the L2 norm over the C channels of the memory token;
2. per image and level, min-max normalisation over that image's *valid* (unpadded)
   locations of the level: s = (n - min) / (max - min), in [0, 1] (all 0 when the level is
   constant, max == min: it tells nothing apart); padded locations are cropped away;
3. each level's valid region resized (bilinear, align_corners=False) to the valid region of
   the finest level, then the mean over levels.

So a score map covers the unpadded image at the finest level's stride. A map cell is
foreground when its centre, in image pixels ``((i + 0.5) * stride_y, (j + 0.5) * stride_x)``,
lies inside a gt box (half-open ``[x1, x2) x [y1, y2)``); the rest is background.

IoF(t) = fraction of foreground cells with score > t; IoB(t) = the same for background
cells; over several images the cells are pooled (each cell counts once). A discriminative
encoder keeps IoF high while IoB falls: its IoF-IoB curve bends towards the top-left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from codetr.data import collate

Maps = Union[torch.Tensor, Sequence[torch.Tensor]]


def level_norms(memory: torch.Tensor, spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """memory [B, S, C], spatial_shapes [L, 2] (H_l, W_l) -> L maps [B, H_l, W_l] of the
    L2 norm over channels (levels are concatenated in S, row-major, as in ``encode``)."""
    norms = memory.float().norm(dim=-1)  # [B, S]
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    return [n.reshape(-1, int(h), int(w)) for n, (h, w) in zip(norms.split(sizes, 1), spatial_shapes.tolist())]


def minmax_normalise(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over all of x; zeros when x is constant."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def score_maps(memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """Discriminability score maps (see the module docstring).

    memory [B, S, C], padding_mask [B, S] (True on padding), spatial_shapes [L, 2] ->
    B maps [h_b, w_b] in [0, 1], h_b x w_b the valid region of image b at the finest level.
    Padding is top-left aligned (``collate``), so a level's valid region is its first rows
    and columns.
    """
    norms = level_norms(memory, spatial_shapes)
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    pads = [p.reshape(-1, int(h), int(w)) for p, (h, w) in zip(padding_mask.split(sizes, 1), spatial_shapes.tolist())]
    finest = max(range(len(sizes)), key=sizes.__getitem__)
    out = []
    for b in range(memory.shape[0]):
        levels = []
        for n, p in zip(norms, pads):
            h, w = int((~p[b, :, 0]).sum()), int((~p[b, 0, :]).sum())
            levels.append(minmax_normalise(n[b, :h, :w]))
        target = levels[finest].shape
        resized = [F.interpolate(s[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
                   for s in levels]
        out.append(torch.stack(resized).mean(0))
    return out


def foreground_mask(boxes: torch.Tensor, map_size: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """boxes [G, 4] xyxy image pixels, map_size (h, w), stride (sy, sx) image pixels per cell
    -> bool [h, w], True where the cell centre lies in some box (the union of the boxes)."""
    h, w = map_size
    cy = (torch.arange(h, dtype=torch.float32) + 0.5) * stride[0]
    cx = (torch.arange(w, dtype=torch.float32) + 0.5) * stride[1]
    b = boxes.float().cpu()
    inx = (cx[None] >= b[:, 0:1]) & (cx[None] < b[:, 2:3])  # [G, w]
    iny = (cy[None] >= b[:, 1:2]) & (cy[None] < b[:, 3:4])  # [G, h]
    return (iny[:, :, None] & inx[:, None, :]).any(0)


def default_thresholds(n: int = 101) -> torch.Tensor:
    """n thresholds evenly spaced over [0, 1]."""
    return torch.linspace(0, 1, n)


def iof_iob(scores: Maps, foreground: Maps, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoF(t) and IoB(t), each [T], for thresholds [T].

    scores and foreground: one map or a list of maps (any shapes, matching pairwise), float
    scores and bool masks; the cells of all maps are pooled. A curve whose cell set is empty
    (no foreground anywhere, or no background) is NaN.
    """
    if torch.is_tensor(scores):
        scores, foreground = [scores], [foreground]
    s = torch.cat([x.float().flatten().cpu() for x in scores])
    fg = torch.cat([m.bool().flatten().cpu() for m in foreground])
    if s.shape != fg.shape:
        raise ValueError(f"scores ({s.numel()} cells) and foreground ({fg.numel()} cells) differ in size")
    t = thresholds.float()

    def fraction_above(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return torch.full_like(t, float("nan"))
        # count(x > t) = n - count(x <= t), by binary search in the sorted scores.
        return (x.numel() - torch.searchsorted(x.sort().values, t, right=True)).float() / x.numel()

    iof, iob = fraction_above(s[fg]), fraction_above(s[~fg])
    return iof, iob


@dataclass
class ImageMap:
    """One image's score map, with what an overlay needs. image [h, w, 3] in [0, 1] (the
    preprocessed image, unpadded), score [h_m, w_m], stride (sy, sx), boxes [G, 4] xyxy."""

    image_id: int
    image: torch.Tensor
    score: torch.Tensor
    stride: tuple[float, float]
    boxes: torch.Tensor


@torch.no_grad()
def image_maps(model, dataset, indices: Sequence[int], device="cpu", size_divisibility: int = 32):
    """Yield an ``ImageMap`` per dataset index (one image at a time, so padding never
    depends on other images). ``dataset`` yields (normalised image, target) pairs, e.g. a
    CocoDetection with the eval transform."""
    from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model.eval()
    for i in indices:
        image, target = dataset[i]
        images, masks, _ = collate([(image, target)], size_divisibility)
        enc = getattr(model, "detector", model).encode(images.to(device), masks.to(device))
        score = score_maps(enc.memory, enc.padding_mask, enc.spatial_shapes)[0].cpu()
        # The finest level's stride: padded image size over that level's (padded) size.
        shapes = enc.spatial_shapes.tolist()
        hf, wf = max(shapes, key=lambda s: s[0] * s[1])
        stride = (images.shape[-2] / hf, images.shape[-1] / wf)
        shown = (image * std + mean).clamp(0, 1).permute(1, 2, 0)
        yield ImageMap(int(target["image_id"]), shown, score, stride, target["boxes"])
