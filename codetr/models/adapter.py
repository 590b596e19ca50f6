"""Co-DETR's multi-scale adapter: the encoder output as a J-level feature pyramid for the
auxiliary heads."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_gn(d: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(d, d, 3, stride=stride, padding=1), nn.GroupNorm(32, d))


def memory_to_maps(memory: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Split the flattened encoder memory [B, S, C] back into per-level maps [B, C, H_l, W_l]
    (the inverse of DeformableDETRPP.encode's flatten, same level order); shapes: (H_l, W_l)."""
    return [m.transpose(1, 2).reshape(memory.shape[0], memory.shape[2], h, w)
            for m, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]


class MultiScaleAdapter(nn.Module):
    """Multi-scale encoders: the L encoder levels as maps, then ``num_outs - L`` extra levels,
    each a 3x3 stride-2 conv + GroupNorm(32) on the previous coarsest map (L = 4, J = 5:
    strides 8..128). Not detached: the auxiliary losses train the encoder, which is the
    point of the method."""

    def __init__(self, d_model: int = 256, num_levels: int = 4, num_outs: int = 5):
        super().__init__()
        if num_outs < num_levels:
            raise ValueError(f"num_outs ({num_outs}) must be >= num_levels ({num_levels})")
        self.num_levels = num_levels
        self.extra = nn.ModuleList(_conv_gn(d_model, 2) for _ in range(num_outs - num_levels))

    def forward(self, memory: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """memory [B, S, C], shapes: L pairs (H_l, W_l) -> J maps [B, C, H_j, W_j], finest first."""
        maps = memory_to_maps(memory, shapes)
        for conv in self.extra:
            maps.append(conv(maps[-1]))
        return maps


class SingleScaleAdapter(nn.Module):
    """Single-scale encoders (one stride-32 map, e.g. a C5-only DETR): levels finer than the
    input by bilinear x2 upsampling + 3x3 conv + GN, coarser by 3x3 stride-2 conv + GN.
    ``in_index`` is the input's position among the J outputs (2 for strides 8..128)."""

    def __init__(self, d_model: int = 256, num_outs: int = 5, in_index: int = 2):
        super().__init__()
        self.in_index = in_index
        self.up = nn.ModuleList(_conv_gn(d_model, 1) for _ in range(in_index))
        self.down = nn.ModuleList(_conv_gn(d_model, 2) for _ in range(num_outs - in_index - 1))

    def forward(self, memory: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """memory [B, S, C] of one level, shapes [(H, W)] -> J maps, finest first."""
        (x,) = memory_to_maps(memory, shapes)
        finer, y = [], x
        for conv in self.up:
            y = conv(F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False))
            finer.insert(0, y)
        coarser, y = [], x
        for conv in self.down:
            y = conv(y)
            coarser.append(y)
        return finer + [x] + coarser
