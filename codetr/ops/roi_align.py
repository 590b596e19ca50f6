"""RoIAlign (Mask R-CNN, He et al. 2017) with torchvision.ops.roi_align's semantics.

Each RoI is divided into output_size bins; a bin is the average of a regular grid of
bilinear samples. The RoI pools features for the RoI head of the Faster R-CNN auxiliary
branch of Co-DETR. The compiled kernels live in csrc/roi_align/; this module holds the
pure-PyTorch reference, the fake kernels and the autograd registration.
"""
from __future__ import annotations

import torch

from . import _extension
from ._checks import (check, check_dim, check_floating, check_same_device, check_tensors, fail,
                      readable, scalar_type, sizes)

OP = "roi_align"


def _pair(output_size) -> tuple[int, int]:
    """output_size as (height, width) of positive ints."""
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            f"roi_align: output_size must be a positive int or a (height, width) pair of "
            f"positive ints, got {output_size!r}"
        )
    return size


def _check_rois(op: str, rois, like: torch.Tensor, like_name: str) -> None:
    check_dim(rois, 2, op, "rois", "[K, 5] (batch_index, x1, y1, x2, y2)")
    check(rois.shape[1] == 5, op, lambda: f"rois must be [K, 5] (batch_index, x1, y1, x2, y2), "
                                          f"got shape {sizes(rois.shape)}")
    check_same_device(like, rois, op, like_name, "rois")
    vt, rt = like.dtype, rois.dtype
    check(rt == vt or (vt in (torch.float16, torch.bfloat16) and rt == torch.float32), op,
          lambda: f"rois must have the dtype of {like_name} ({scalar_type(vt)}) or float32 when "
                  f"{like_name} is float16/bfloat16, got {scalar_type(rt)}")


def _check_pooled(op: str, pooled_height: int, pooled_width: int, sampling_ratio: int) -> None:
    check(pooled_height > 0 and pooled_width > 0, op,
          lambda: f"output size (pooled_height, pooled_width) must be positive, got "
                  f"({pooled_height}, {pooled_width})")
    check(sampling_ratio < 2**20, op,
          lambda: f"sampling_ratio must be < 2^20 (or <= 0 for adaptive), got {sampling_ratio}")


def _check_batch_indices(op: str, rois: torch.Tensor, N: int) -> None:
    # After torchvision's truncation toward zero; NaN fails. Read on CPU only, as the kernels.
    if not readable(rois) or rois.shape[0] == 0:
        return
    b = rois[:, 0].detach().double()
    bad = ~((b > -1) & (b < N))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        fail(op, f"rois[:, 0] must hold batch indices in [0, N) with N = {N} (the input's batch "
                 f"size), got rois[{k}, 0] = {float(b[k]):g}")


def check_forward(input, rois, pooled_height: int, pooled_width: int, sampling_ratio: int) -> None:
    """The kernels' checks (check_forward in csrc/roi_align/roi_align.h), with their messages."""
    check_tensors(OP, input=input, rois=rois)
    check_dim(input, 4, OP, "input", "[N, C, H, W]")
    check_floating(input, OP, "input")
    _check_rois(OP, rois, input, "input")
    _check_pooled(OP, pooled_height, pooled_width, sampling_ratio)
    _check_batch_indices(OP, rois, input.shape[0])


def check_backward(grad_output, rois, pooled_height, pooled_width, N, C, H, W,
                   sampling_ratio) -> None:
    """check_backward in csrc/roi_align/roi_align.h, for the fake backward kernel."""
    op = "roi_align_backward"
    check_dim(grad_output, 4, op, "grad_output", "[K, C, pooled_height, pooled_width]")
    check_floating(grad_output, op, "grad_output")
    _check_rois(op, rois, grad_output, "grad_output")
    _check_pooled(op, pooled_height, pooled_width, sampling_ratio)
    check(N >= 0 and C >= 0 and H >= 0 and W >= 0, op,
          lambda: f"input sizes (batch_size, channels, height, width) must be non-negative, got "
                  f"({N}, {C}, {H}, {W})")
    expected = (rois.shape[0], C, pooled_height, pooled_width)
    check(tuple(grad_output.shape) == expected, op,
          lambda: f"grad_output must be [K, C, pooled_height, pooled_width] = {sizes(expected)}, "
                  f"got {sizes(grad_output.shape)}")
    _check_batch_indices(op, rois, N)


def roi_align_reference(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch RoIAlign, written as one sparse interpolation matrix.

    Args:
        input: [N, C, H, W] feature map.
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates; input's dtype,
            or float32 when input is float16/bfloat16. batch_index in [0, N) (truncated
            toward zero, as torchvision does).
        output_size: int or (oh, ow), bins per RoI.
        spatial_scale: feature-map pixels per image pixel (1 / stride).
        sampling_ratio: samples per bin along each axis; <= 0: adaptive,
            ceil(roi_size / output_size) per RoI.
        aligned: shift the RoI by -0.5 pixel (pixel centres at integer + 0.5). If False,
            RoIs smaller than 1x1 are enlarged to 1x1 (torchvision's legacy behaviour).
    Returns:
        [K, C, oh, ow] in input's dtype (computed in float32 for float16/bfloat16 input).
        Differentiable with respect to input only.

    Every sample's four bilinear weights, divided by the bin's sample count, become entries
    of a sparse matrix M [K*oh*ow, N*H*W]; the output is M @ input in channels-last layout.
    The sample coordinates and weights follow torchvision's kernel operation for operation.
    """
    PH, PW = _pair(output_size)
    check_forward(input, rois, PH, PW, int(sampling_ratio))
    N, C, H, W = input.shape
    K = rois.shape[0]
    compute = torch.promote_types(input.dtype, torch.float32)
    if K == 0 or C == 0 or H == 0 or W == 0:
        # Nothing is sampled; adding an empty sum keeps the output attached to input's graph.
        return input.new_zeros((K, C, PH, PW)) + input.reshape(-1)[:0].sum()
    dev = input.device
    r = rois.detach().to(compute)  # the RoIs get no gradient (torchvision's contract)
    batch = r[:, 0].long()  # truncation toward zero, like torchvision's int cast

    # RoI geometry (torchvision's arithmetic, in the compute dtype).
    scale = torch.tensor(spatial_scale, dtype=compute, device=dev)
    offset = 0.5 if aligned else 0.0
    start_w = r[:, 1] * scale - offset
    start_h = r[:, 2] * scale - offset
    roi_w = (r[:, 3] * scale - offset) - start_w
    roi_h = (r[:, 4] * scale - offset) - start_h
    if not aligned:  # legacy: malformed RoIs forced to 1x1
        roi_w = torch.where(roi_w < 1, torch.ones_like(roi_w), roi_w)
        roi_h = torch.where(roi_h < 1, torch.ones_like(roi_h), roi_h)
    bin_h, bin_w = roi_h / PH, roi_w / PW
    if sampling_ratio > 0:
        grid_h = torch.full((K,), sampling_ratio, dtype=torch.long, device=dev)
        grid_w = grid_h
    else:
        def adaptive(extent, pooled):
            g = torch.ceil(extent / pooled)
            ok = (g > 0) & (g < 2**30)  # NaN and non-positive extents: no samples
            return torch.where(ok, g, torch.zeros_like(g)).long()

        grid_h, grid_w = adaptive(roi_h, PH), adaptive(roi_w, PW)
    count = (grid_h * grid_w).clamp(min=1).to(compute)

    # One entry per sample (k, ph, pw, iy, ix), RoI after RoI.
    per_roi = PH * PW * grid_h * grid_w
    k = torch.repeat_interleave(torch.arange(K, device=dev), per_roi)
    local = torch.arange(k.numel(), device=dev) - (torch.cumsum(per_roi, 0) - per_roi)[k]
    gh, gw = grid_h[k], grid_w[k]
    ix = local % gw
    iy = (local // gw) % gh
    pw = (local // (gw * gh)) % PW
    ph = local // (gw * gh * PW)
    y = start_h[k] + ph.to(compute) * bin_h[k] + (iy.to(compute) + 0.5) * bin_h[k] / gh.to(compute)
    x = start_w[k] + pw.to(compute) * bin_w[k] + (ix.to(compute) + 0.5) * bin_w[k] / gw.to(compute)

    # Bilinear weights; samples outside [-1, H] x [-1, W] (or NaN) contribute nothing.
    valid = (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    y = torch.where(valid, y, torch.zeros_like(y)).clamp(min=0)
    x = torch.where(valid, x, torch.zeros_like(x)).clamp(min=0)
    y_low, x_low = y.long(), x.long()
    y_edge, x_edge = y_low >= H - 1, x_low >= W - 1  # stick to the last row / column
    y_low = torch.where(y_edge, torch.full_like(y_low, H - 1), y_low)
    x_low = torch.where(x_edge, torch.full_like(x_low, W - 1), x_low)
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    ly = torch.where(y_edge, torch.zeros_like(y), y - y_low.to(compute))
    lx = torch.where(x_edge, torch.zeros_like(x), x - x_low.to(compute))
    hy, hx = 1 - ly, 1 - lx

    row = (k * PH + ph) * PW + pw  # output bin
    base = batch[k] * (H * W)
    cols = torch.cat([base + y_low * W + x_low, base + y_low * W + x_high,
                      base + y_high * W + x_low, base + y_high * W + x_high])
    vals = torch.cat([hy * hx, hy * lx, ly * hx, ly * lx]) / count[k].repeat(4)
    keep = valid.repeat(4)
    M = torch.sparse_coo_tensor(
        torch.stack([row.repeat(4)[keep], cols[keep]]), vals[keep], (K * PH * PW, N * H * W),
        check_invariants=True,
    )
    features = input.to(compute).permute(0, 2, 3, 1).reshape(N * H * W, C)
    out = torch.sparse.mm(M, features)  # [K*PH*PW, C]
    return out.view(K, PH, PW, C).permute(0, 3, 1, 2).contiguous().to(input.dtype)


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign; same contract as `roi_align_reference` (and torchvision.ops.roi_align with
    [K, 5] boxes).

    Differentiable with respect to input (the RoIs get no gradient, as in torchvision).
    Runs the compiled CPU/CUDA kernel when available (see `codetr.ops.extension_info()`),
    else the reference. On CPU, a batch index outside [0, N) raises; on CUDA (where
    checking would need a host sync) such a RoI gives zeros and no gradient.
    """
    PH, PW = _pair(output_size)
    check_tensors(OP, input=input, rois=rois)
    if _extension.use_compiled(OP, input.device):
        return torch.ops.codetr.roi_align(
            input, rois, float(spatial_scale), PH, PW, int(sampling_ratio), bool(aligned)
        )
    return roi_align_reference(input, rois, (PH, PW), spatial_scale, sampling_ratio, aligned)


if _extension.declare(OP):

    @torch.library.register_fake("codetr::roi_align")
    def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        check_forward(input, rois, pooled_height, pooled_width, sampling_ratio)
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("codetr::roi_align_backward")
    def _(grad_output, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
          height, width, sampling_ratio, aligned):
        check_backward(grad_output, rois, pooled_height, pooled_width, batch_size, channels,
                       height, width, sampling_ratio)
        return grad_output.new_empty((batch_size, channels, height, width))

    def _setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)  # the input itself is not needed: the op is linear in it
        ctx.input_shape = input.shape
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def _backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        N, C, H, W = ctx.input_shape
        grad_input = torch.ops.codetr.roi_align_backward(
            grad_output, rois, spatial_scale, pooled_height, pooled_width, N, C, H, W,
            sampling_ratio, aligned,
        )
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd("codetr::roi_align", _backward, setup_context=_setup_context)
