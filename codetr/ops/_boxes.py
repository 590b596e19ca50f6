"""Argument checks and dtype rules shared by the box operators' Python wrappers.

The wrappers check shapes before reshaping, so that the compiled and the reference paths
raise the same error, naming the op and the argument.
"""
from __future__ import annotations

import torch

from ._checks import check, check_dim, check_same_device as kernel_same_device, scalar_type, sizes


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: float16/bfloat16 and integer boxes
    are computed in float32 (box statistics are always fp32 or fp64, also under autocast)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_boxes(op: str, name: str, boxes, shape: str, min_dim: int = 2, dim: int | None = None) -> None:
    """boxes must be a tensor `shape` with 4 coordinates in the last dimension, with
    exactly `dim` dimensions if given, else at least `min_dim`."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor {shape}, got {type(boxes).__name__}")
    ok = boxes.dim() == dim if dim is not None else boxes.dim() >= min_dim
    if not ok or boxes.shape[-1] != 4:
        raise ValueError(
            f"{op}: {name} must be {shape} with 4 coordinates (x1, y1, x2, y2) in the last "
            f"dimension, got shape {tuple(boxes.shape)}"
        )
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{op}: {name} must be a real floating-point or integer tensor, got {boxes.dtype}")


def check_same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


# The compiled kernels' own checks (csrc/box_ops/box_ops.h), for the fake kernels: the
# wrappers above reshape and convert before the kernel, so these fire only on a direct
# torch.ops.codetr call, with the kernel's messages.
def kernel_boxes(t: torch.Tensor, dim: int, op: str, name: str, shape: str) -> None:
    check_dim(t, dim, op, name, shape)
    check(t.shape[-1] == 4, op, lambda: f"{name} must be {shape} with 4 coordinates (x1, y1, x2, "
                                        f"y2) in the last dimension, got shape {sizes(t.shape)}")
    check(t.dtype in (torch.float32, torch.float64), op,
          lambda: f"{name} must be float32 or float64 (the Python wrapper converts "
                  f"float16/bfloat16 and integer boxes to float32), got {scalar_type(t.dtype)}")


def kernel_same_dtype(a: torch.Tensor, b: torch.Tensor, op: str, name_a: str, name_b: str) -> None:
    check(b.dtype == a.dtype, op, lambda: f"{name_b} must have the dtype of {name_a} "
                                          f"({scalar_type(a.dtype)}), got {scalar_type(b.dtype)}")


def kernel_pair(a: torch.Tensor, b: torch.Tensor, op: str, name_a: str, name_b: str) -> None:
    kernel_same_device(a, b, op, name_a, name_b)
    kernel_same_dtype(a, b, op, name_a, name_b)
