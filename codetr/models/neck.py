"""ChannelMapper neck: backbone maps -> 256-channel multi-scale maps for the encoder."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backbones import drop_empty_mask, mask_to


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics use only unpadded positions, so an image's features do not
    depend on how much padding its batch partners force on it. Padded outputs are zero."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = mask_to(mask, x)
        if m is None:
            return super().forward(x)
        B, C, H, W = x.shape
        G = self.num_groups
        valid = (~m).to(x.dtype)[:, None, None]  # [B, 1, 1, H, W]
        xg = x.view(B, G, C // G, H, W)
        count = valid.sum((2, 3, 4), keepdim=True).clamp(min=1) * (C // G)
        mean = (xg * valid).sum((2, 3, 4), keepdim=True) / count
        var = (((xg - mean) * valid) ** 2).sum((2, 3, 4), keepdim=True) / count
        y = ((xg - mean) * (var + self.eps).rsqrt() * valid).view(B, C, H, W)
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]) * (~m)[:, None]


class ChannelMapper(nn.Module):
    """Per input level a 1x1 conv + GroupNorm(32) to ``out_channels``, plus ``num_extra``
    levels made by 3x3 stride-2 conv + GroupNorm, the first on the last *backbone* map (as in
    Deformable DETR), the next ones on the previous extra level. The convs have no bias, as
    mmdetection's ConvModule before a norm (the official checkpoints have none).

    Args:
        in_channels: channels of each backbone map.
        out_channels: channels of every output level.
        num_extra: extra coarser levels (1: strides 8, 16, 32 -> 8, 16, 32, 64).
        num_groups: GroupNorm groups.

    ``forward(features: list of [B, C_i, H_i, W_i], mask [B, H, W] or None)`` -> list of
    ``len(in_channels) + num_extra`` maps ``[B, out_channels, H_l, W_l]``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_extra: int = 1,
                 num_groups: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=False) for c in in_channels)
        self.norms = nn.ModuleList(MaskedGroupNorm(num_groups, out_channels) for _ in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_extra - 1)
        self.extra_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 3, stride=2, padding=1, bias=False)
                                         for c in extra_in)
        self.extra_norms = nn.ModuleList(MaskedGroupNorm(num_groups, out_channels) for _ in extra_in)
        for conv in [*self.convs, *self.extra_convs]:
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, features: list[torch.Tensor], mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        mask = drop_empty_mask(mask)
        outs = [norm(conv(f), mask) for f, conv, norm in zip(features, self.convs, self.norms)]
        x = features[-1]
        for conv, norm in zip(self.extra_convs, self.extra_norms):
            x = norm(conv(x), mask)
            outs.append(x)
        return outs
