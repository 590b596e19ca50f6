"""Sine position encodings: for feature maps (DETR's, normalised to the unpadded extent) and
for boxes/points given as normalised coordinates (the decoder's query positions)."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Args:
        num_pos_feats: features per axis (output channels = 2 * num_pos_feats).
        temperature: frequency base.
        scale: coordinates are normalised to [0, scale] over the unpadded image.

    ``forward(mask [B, H, W] bool, True on padding)`` -> ``[B, 2 * num_pos_feats, H, W]``
    (y features first, then x, as in DETR). Positions count only unpadded pixels, so an
    image's encoding does not depend on its batch partners.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        # -0.5: pixel centres (Deformable DETR's convention).
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        px, py = x[..., None] / dim_t, y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), 4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), 4).flatten(3)
        return torch.cat((py, px), 3).permute(0, 3, 1, 2)


def coord_sine_embed(coords: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of normalised coordinates.

    coords [..., D] in [0, 1] (D = 2 points or 4 boxes cx, cy, w, h) -> [..., D * num_pos_feats],
    each coordinate scaled by 2*pi then encoded like one axis of ``PositionEmbeddingSine``.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = coords.float()[..., None] * (2 * math.pi) / dim_t  # [..., D, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2)
    return pos.flatten(-2).to(coords.dtype)
