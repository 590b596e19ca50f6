"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Each query m-th head gathers P bilinear samples on each of L feature levels and returns
their attention-weighted sum. The compiled kernels live in csrc/ms_deform_attn/; this module
holds the pure-PyTorch reference, the fake kernel and the autograd registration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension
from ._checks import (check, check_dim, check_dtype, check_floating, check_same_device,
                      check_tensors, readable, scalar_type, sizes)

OP = "ms_deform_attn"
_REDUCED = (torch.float16, torch.bfloat16)


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, op: str = OP) -> tuple[int, ...]:
    """The kernels' checks (csrc/ms_deform_attn/ms_deform_attn.h check_inputs), with their
    messages; returns (N, S, M, D, Q, L, P). The value-dependent ones (sizes, level starts)
    run on readable (CPU, non-fake) tensors only, as in the kernels."""
    check_tensors(op, value=value, spatial_shapes=spatial_shapes,
                  level_start_index=level_start_index, sampling_locations=sampling_locations,
                  attention_weights=attention_weights)
    check_dim(value, 4, op, "value", "[N, S, M, D]")
    check_dim(spatial_shapes, 2, op, "spatial_shapes", "[L, 2]")
    check_dim(level_start_index, 1, op, "level_start_index", "[L]")
    check_dim(sampling_locations, 6, op, "sampling_locations", "[N, Q, M, L, P, 2]")
    check_dim(attention_weights, 5, op, "attention_weights", "[N, Q, M, L, P]")
    check_floating(value, op, "value")
    check_dtype(spatial_shapes, torch.int64, op, "spatial_shapes")
    check_dtype(level_start_index, torch.int64, op, "level_start_index")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                    ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        check_same_device(value, t, op, "value", name)
    vt, ct = value.dtype, sampling_locations.dtype
    check(ct == vt or (vt in _REDUCED and ct == torch.float32), op,
          lambda: f"sampling_locations must have the dtype of value ({scalar_type(vt)}) or "
                  f"float32 when value is float16/bfloat16, got {scalar_type(ct)}")
    check(attention_weights.dtype == ct, op,
          lambda: f"attention_weights must have the dtype of sampling_locations "
                  f"({scalar_type(ct)}), got {scalar_type(attention_weights.dtype)}")
    N, S, M, D = value.shape
    L, Q, P = spatial_shapes.shape[0], sampling_locations.shape[1], sampling_locations.shape[4]
    check(spatial_shapes.shape[1] == 2, op,
          lambda: f"spatial_shapes must be [L, 2] (H, W), got {sizes(spatial_shapes.shape)}")
    check(level_start_index.shape[0] == L, op,
          lambda: f"level_start_index must be [L] with L = {L} (rows of spatial_shapes), got "
                  f"{sizes(level_start_index.shape)}")
    ls = sampling_locations.shape
    check(ls[0] == N and ls[2] == M and ls[3] == L and ls[5] == 2, op,
          lambda: f"sampling_locations must be [N, Q, M, L, P, 2] = [{N}, Q, {M}, {L}, P, 2], "
                  f"got {sizes(ls)}")
    check(tuple(attention_weights.shape) == (N, Q, M, L, P), op,
          lambda: f"attention_weights must be [N, Q, M, L, P] = [{N}, {Q}, {M}, {L}, {P}], got "
                  f"{sizes(attention_weights.shape)}")
    if readable(spatial_shapes) and readable(level_start_index):
        total = 0
        for lvl, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(),
                                                  level_start_index.tolist())):
            check(H >= 0 and W >= 0, op, lambda: f"spatial_shapes must hold non-negative (H, W), "
                                                 f"got ({H}, {W}) at level {lvl}")
            check(start == total, op, lambda: f"level_start_index[{lvl}] must be {total} "
                                              f"(cumulative H*W of the previous levels), got {start}")
            total += H * W
        check(total == S, op, lambda: f"value has S = {S} positions but spatial_shapes sums to "
                                      f"{total}")
    return N, S, M, D, Q, L, P


def check_grad_output(grad_output, value, dims, op: str = "ms_deform_attn_backward") -> None:
    """The backward kernel's check of grad_output (check_grad_output in the header)."""
    N, _, M, D, Q, _, _ = dims
    check_tensors(op, grad_output=grad_output)
    check_same_device(value, grad_output, op, "value", "grad_output")
    check(grad_output.dtype == value.dtype, op,
          lambda: f"grad_output must have the dtype of value ({scalar_type(value.dtype)}), got "
                  f"{scalar_type(grad_output.dtype)}")
    check(tuple(grad_output.shape) == (N, Q, M * D), op,
          lambda: f"grad_output must be [N, Q, M*D] = [{N}, {Q}, {M * D}], got "
                  f"{sizes(grad_output.shape)}")


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
    N, S, M, D, Q, L, P = check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    compute = torch.promote_types(value.dtype, torch.float32)
    # Zero, but in the graph of every input: an empty or all-off-map call still has a
    # gradient (zero), as on the compiled path.
    out = value.new_zeros((N * M, D, Q), dtype=compute) + sum(
        t.reshape(-1)[:0].sum() for t in (value, sampling_locations, attention_weights))
    if out.numel() == 0 or P == 0:
        return out.view(N, M * D, Q).transpose(1, 2).contiguous().to(value.dtype)
    # grid_sample wants [N*M, D, H, W] maps and [N*M, Q, P, 2] grids in [-1, 1].
    locations = sampling_locations.to(compute).transpose(1, 2).flatten(0, 1)  # [N*M, Q, L, P, 2]
    weights = attention_weights.to(compute).transpose(1, 2).flatten(0, 1)  # [N*M, Q, L, P]
    for lvl, ((H, W), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        if H * W == 0:
            continue
        loc = locations[:, :, lvl]
        # The kernels' test (make_sample in ms_deform_attn_kernel.h): a sample with no corner
        # on the map, or at a non-finite location, contributes nothing, whatever its weight
        # (NaN included); grid_sample would give NaN for an infinite location.
        px, py = loc[..., 0] * W - 0.5, loc[..., 1] * H - 0.5
        inside = (px >= -1) & (py >= -1) & (px < W) & (py < H)
        grid = torch.where(inside[..., None], 2 * loc - 1, -2.0)  # -2: every corner off the map
        v = value[:, start : start + H * W].to(compute)
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        sampled = F.grid_sample(
            v, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [N*M, D, Q, P]
        out = out + (sampled * torch.where(inside, weights[:, :, lvl], 0.0)[:, None]).sum(-1)
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
    check_tensors(OP, value=value, spatial_shapes=spatial_shapes,
                  level_start_index=level_start_index, sampling_locations=sampling_locations,
                  attention_weights=attention_weights)
    if _extension.use_compiled(OP, value.device):
        return torch.ops.codetr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


if _extension.declare(OP):

    @torch.library.register_fake("codetr::ms_deform_attn")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        N, _, M, D, Q, _, _ = check_inputs(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return value.new_empty((N, Q, M * D))

    @torch.library.register_fake("codetr::ms_deform_attn_backward")
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
          attention_weights):
        op = "ms_deform_attn_backward"
        dims = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, op=op)
        check_grad_output(grad_output, value, dims, op=op)
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
