"""Argument checks and dtype rules shared by the box operators' Python wrappers.

The wrappers check shapes before reshaping, so that the compiled and the reference paths
raise the same error, naming the op and the argument.
"""
from __future__ import annotations

import torch


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
