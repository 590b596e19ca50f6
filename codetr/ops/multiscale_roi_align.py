"""Multi-level RoI feature extractor (mmdetection's SingleRoIExtractor semantics).

The Faster R-CNN auxiliary head of Co-DETR pools each proposal from one level of the
feature pyramid, chosen by the proposal's size: large RoIs read coarse levels.
"""
from __future__ import annotations

import torch
from torch import nn

from .roi_align import _pair, roi_align


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """Pyramid level of each RoI, mmdetection's SingleRoIExtractor.map_roi_levels:

        scale = sqrt(w * h);  level = floor(log2(scale / finest_scale + 1e-6)), clamped to
        [0, num_levels - 1]

    i.e. scale < 2 * finest_scale -> level 0, [2, 4) * finest_scale -> level 1, and so on.
    RoIs with a negative or NaN area (no meaningful scale) go to level 0.

    Args:
        rois: [K, 5] (batch_index, x1, y1, x2, y2) or [K, 4] (x1, y1, x2, y2), image pixels.
        num_levels: number of pyramid levels L.
        finest_scale: the scale threshold of level 0 (see above).
    Returns:
        [K] int64 levels in [0, L - 1].
    """
    boxes = rois[:, -4:]
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    levels = torch.nan_to_num(levels, nan=0.0)
    return levels.clamp(min=0, max=num_levels - 1).long()


def multiscale_roi_align(
    features: list[torch.Tensor],
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    strides: tuple[int, ...],
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56.0,
    roi_align_fn=roi_align,
) -> torch.Tensor:
    """Functional form of `MultiScaleRoIAlign` (see there); `roi_align_fn` is the RoIAlign
    used on each level (another implementation with roi_align's signature, for
    benchmarks).

    Each level's RoIs are pooled in one call and written to their rows of the output; the
    backward pass gathers each level's rows of the output gradient (no per-level copies of
    the whole output or of its gradient).
    """
    if len(features) != len(strides):
        raise ValueError(
            f"MultiScaleRoIAlign: features must hold one map per stride ({len(strides)}), got "
            f"{len(features)}"
        )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            "MultiScaleRoIAlign: rois must be [K, 5] (batch_index, x1, y1, x2, y2), got shape "
            f"{tuple(rois.shape)}"
        )
    C = features[0].shape[1]
    if any(f.dim() != 4 or f.shape[1] != C for f in features):
        raise ValueError(
            "MultiScaleRoIAlign: features must be 4-d [N, C, H_l, W_l] with one C, got shapes "
            f"{[tuple(f.shape) for f in features]}"
        )
    output_size = _pair(output_size)
    levels = map_roi_levels(rois, len(features), finest_scale)
    rows = [torch.nonzero(levels == lvl).squeeze(1) for lvl in range(len(features))]
    pooled = [
        roi_align_fn(feat, rois[r], output_size, 1.0 / stride, sampling_ratio, aligned)
        for feat, r, stride in zip(features, rows, strides)
    ]
    return _PutRows.apply(rows, *pooled)


class _PutRows(torch.autograd.Function):
    """out[rows[l]] = values[l] for each l, where the rows partition range(K): one write
    of the output forward, one gather of each part of its gradient backward."""

    @staticmethod
    def forward(ctx, rows, *values):
        K = sum(r.numel() for r in rows)
        out = values[0].new_empty((K, *values[0].shape[1:]))
        for r, v in zip(rows, values):
            out[r] = v
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, *[grad[r] for r in ctx.rows])


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign on a feature pyramid, each RoI on the level `map_roi_levels` picks.

    Args:
        output_size: int or (oh, ow), bins per RoI.
        strides: stride (image pixels per feature pixel) of each level, finest first; the
            level's spatial_scale is 1 / stride.
        sampling_ratio: samples per bin and axis; <= 0: adaptive (see `roi_align`).
        aligned: RoIAlign's half-pixel shift (True in mmdetection/Detectron2).
        finest_scale: RoIs with sqrt(area) < 2 * finest_scale go to the finest level. 56 is
            mmdetection's SingleRoIExtractor default (kept here); the issue text quotes 112
            for Co-DETR's R-CNN head config, which sends every RoI one level finer than 56
            does: pass it explicitly when building that head.

    No parameters. forward(features, rois):
        features: list of L maps [N, C, H_l, W_l] (same N, C and dtype).
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in image pixels.
        returns [K, C, oh, ow], row k pooled from rois[k]'s level.
    The per-level split (nonzero) reads the levels on the host: one sync on CUDA, inherent
    to running one RoIAlign per level.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int] = 7,
        strides: tuple[int, ...] = (8, 16, 32, 64),
        sampling_ratio: int = 0,
        aligned: bool = True,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.strides = tuple(strides)
        if not self.strides or any(s <= 0 for s in self.strides):
            raise ValueError(f"MultiScaleRoIAlign: strides must be positive, got {strides!r}")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.finest_scale = float(finest_scale)

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        return multiscale_roi_align(
            features, rois, self.output_size, self.strides, self.sampling_ratio, self.aligned,
            self.finest_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, strides={self.strides}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
            f"finest_scale={self.finest_scale}"
        )
