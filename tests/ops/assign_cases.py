"""Inputs shared by the assigner tests: mmdetection-style anchor grids and random gts."""
from __future__ import annotations

import torch


def grid_anchors(H: int, W: int, strides=(8, 16, 32, 64, 128), scales=(8.0,), ratios=(1.0,)):
    """mmdetection's AnchorGenerator (center_offset 0): per level, per location (x * s, y * s)
    of a ceil(H / s) x ceil(W / s) map, one anchor per (ratio, scale) of side scale * s.
    Returns (anchors [A, 4] float32, num_anchors_per_level)."""
    out, counts = [], []
    for s in strides:
        h, w = -(-H // s), -(-W // s)
        y, x = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        centres = torch.stack([x.flatten(), y.flatten()], -1)
        per_loc = []
        for r in ratios:
            for sc in scales:
                half = torch.tensor([sc * s / r**0.5 / 2, sc * s * r**0.5 / 2])
                per_loc.append(torch.cat([centres - half, centres + half], -1))
        a = torch.stack(per_loc, 1).reshape(-1, 4)
        out.append(a)
        counts.append(a.shape[0])
    return torch.cat(out), counts


def random_gts(gen: torch.Generator, B: int, G: int, H: int, W: int, min_side: float = 2.0,
               max_frac: float = 0.6) -> torch.Tensor:
    """[B, G, 4] xyxy boxes inside an H x W image, sides from min_side to max_frac of it."""
    size = torch.tensor([W * max_frac, H * max_frac])
    wh = torch.rand(B, G, 2, generator=gen) ** 2 * size + min_side
    xy = torch.rand(B, G, 2, generator=gen) * (torch.tensor([W, H]) - wh)
    return torch.cat([xy, xy + wh], -1)
