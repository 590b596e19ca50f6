"""The multi-scale deformable attention module of Deformable DETR (Zhu et al., 2021)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codetr.ops import ms_deform_attn


def level_index(shapes: Sequence[tuple[int, int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_l, W_l) of L levels -> (spatial_shapes [L, 2] int64, level_start_index [L] int64),
    the op's description of the flattened maps.

    Models keep the shapes as Python ints (SymInts when traced) and build these tensors from
    them, never the other way: reading a tensor back (``tolist``) is a host sync on CUDA and
    a data-dependent size for torch.export."""
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total = total + h * w
    sizes = [v for hw in shapes for v in hw]
    if any(isinstance(v, torch.SymInt) for v in sizes):
        # Traced with symbolic sizes: torch.as_tensor would specialise them to constants.
        def tensor(values):
            return torch.stack([torch.scalar_tensor(v, dtype=torch.int64, device=device) for v in values])
        return tensor(sizes).view(-1, 2), tensor(starts)
    return (torch.as_tensor(sizes, dtype=torch.int64, device=device).view(-1, 2),
            torch.as_tensor(starts, dtype=torch.int64, device=device))


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled locations per head and level around its
    reference point; offsets and attention weights are predicted from the query.

    Args:
        d_model: channels of queries and values (split evenly over heads).
        n_levels: feature levels L.
        n_heads: attention heads M.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of directions (one per
        head, radius growing with the point index), uniform attention, Xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def project_value(self, value: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """value [N, S, C] -> [N, S, M, C/M]: the value projection, zero at padding."""
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        return v.view(*value.shape[:2], self.n_heads, self.d_model // self.n_heads)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Q, C].
            reference_points: [N, Q, L, 2] normalised (x, y) in [0, 1], or [N, Q, L, 4]
                boxes (cx, cy, w, h): offsets are then scaled by half the box size.
            value: [N, S, C], the flattened multi-level feature maps, or their projection
                [N, S, M, C/M] from ``project_value`` (reused when several query sets attend
                to the same memory, e.g. Co-DETR's query groups).
            spatial_shapes: [L, 2] int64 (H, W) of each level.
            level_start_index: [L] int64 offset of each level in S.
            padding_mask: [N, S] bool, True at padded positions (their values are zeroed).
        Returns:
            [N, Q, C].
        """
        N, Q, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must end in 2 (points) or 4 (boxes), got shape "
                f"{tuple(reference_points.shape)}"
            )
        v = value if value.dim() == 4 else self.project_value(value, padding_mask)
        offsets = self.sampling_offsets(query).view(N, Q, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(N, Q, M, L * P), -1)
        weights = weights.view(N, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            # One pass over the [N, Q, M, L, P, 2] offsets instead of a division and an add.
            inverse = 1.0 / spatial_shapes.flip(-1).to(offsets.dtype)
            locations = torch.addcmul(reference_points[:, :, None, :, None, :], offsets,
                                      inverse[None, None, None, :, None, :])
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        # Coordinates and weights in (at least) fp32 even when autocast made them half: the
        # op's contract (sub-pixel positions need the mantissa).
        coord_dtype = torch.promote_types(locations.dtype, torch.float32)
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations.to(coord_dtype),
                             weights.to(coord_dtype))
        return self.output_proj(out)
