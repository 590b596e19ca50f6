"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Each query m-th head gathers P bilinear samples on each of L feature levels and returns
their attention-weighted sum. The compiled kernels live in csrc/ms_deform_attn/; this module
holds the pure-PyTorch reference, the fake kernel and the autograd registration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension

OP = "ms_deform_attn"


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (one grid_sample per level).

    Args:
        value: [N, S, M, D], S = sum over levels of H_l * W_l.
        spatial_shapes: [L, 2] int64, (H_l, W_l) per level.
        level_start_index: [L] int64, offset of each level in S.
        sampling_locations: [N, Q, M, L, P, 2] normalised (x, y) in [0, 1]; the pixel
            coordinate is loc * size - 0.5 (grid_sample, align_corners=False), zero outside.
        attention_weights: [N, Q, M, L, P].
    Returns:
        [N, Q, M * D] in value's dtype. Levels are accumulated one at a time, so the
        samples of all levels are never held at once. Half/bfloat16 inputs are computed
        in float32.
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    compute = torch.promote_types(value.dtype, torch.float32)
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    # grid_sample wants [N*M, D, H, W] maps and [N*M, Q, P, 2] grids in [-1, 1].
    grids = (2 * sampling_locations.to(compute) - 1).transpose(1, 2).flatten(0, 1)  # [N*M, Q, L, P, 2]
    weights = attention_weights.to(compute).transpose(1, 2).flatten(0, 1)  # [N*M, Q, L, P]
    out = value.new_zeros((N * M, D, Q), dtype=compute)
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        v = value[:, start : start + H * W].to(compute)
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        sampled = F.grid_sample(
            v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [N*M, D, Q, P]
        out = out + (sampled * weights[:, None, :, lvl]).sum(-1)
    return out.view(N, M * D, Q).transpose(1, 2).contiguous().to(value.dtype)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; same contract as `ms_deform_attn_reference`.

    Differentiable in value, sampling_locations and attention_weights. Runs the compiled
    CPU/CUDA kernel when available (see `codetr.ops.extension_info()`), else the
    reference. sampling_locations and attention_weights share a dtype: value's, or
    float32 when value is float16/bfloat16 (coordinates and accumulation stay fp32).

    When there are about as many samples as value positions or more (an encoder), the CPU
    kernel copies value one head at a time into a buffer of that head's maps with a frame of
    zeros around each level, (S + border) * D elements; its backward has two such buffers
    per thread (the second accumulates the head's grad_value, fp32 for half value). Each
    thread keeps its buffers between calls, grown to the largest head seen (3 MB each for
    an 800 x 1333 image's four levels with D = 32).
    """
    if _extension.use_compiled(OP, value.device):
        return torch.ops.codetr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


if _extension.declare(OP):

    def _check_devices(value, **others):
        # The C++ kernels check this too, but a mix with a meta tensor dispatches here.
        for name, t in others.items():
            if t.device != value.device:
                raise RuntimeError(f"ms_deform_attn: {name} must be on the same device as value "
                                   f"({value.device}), got {t.device}")

    @torch.library.register_fake("codetr::ms_deform_attn")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _check_devices(value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                       sampling_locations=sampling_locations, attention_weights=attention_weights)
        N, _, M, D = value.shape
        Q = sampling_locations.shape[1]
        return value.new_empty((N, Q, M * D))

    @torch.library.register_fake("codetr::ms_deform_attn_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
          attention_weights):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_loc, grad_attn = torch.ops.codetr.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights,
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd(
        "codetr::ms_deform_attn", _backward, setup_context=_setup_context
    )
