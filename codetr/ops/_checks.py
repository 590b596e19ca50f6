"""The compiled kernels' argument checks (csrc/common/common.h), written once more in Python.

Each op's `check_*` function in its module validates exactly as its C++ check does and
raises the same RuntimeError text, so the reference path, the fake (meta) kernels and the
compiled kernels reject the same inputs with the same message ("ms_deform_attn: value must
be 4-d [N, S, M, D], got 3-d tensor of shape [20, 1, 2]"). The formatting follows c10's:
sizes as [a, b], dtypes by their ScalarType names (Float, Long, ...).
tests/ops/test_malformed_inputs.py holds every op's malformed cases and compares the paths.
"""
from __future__ import annotations

import torch

# c10::ScalarType names, as TORCH_CHECK prints a dtype.
_SCALAR_TYPE = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def scalar_type(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE.get(dtype, str(dtype).removeprefix("torch."))


def sizes(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def fail(op: str, message: str):
    raise RuntimeError(f"{op}: {message}")


def check(cond: bool, op: str, message) -> None:
    """CODETR_CHECK_ARG: `message` may be a callable, formatted only on failure."""
    if not cond:
        fail(op, message() if callable(message) else message)


def check_tensors(op: str, **tensors) -> None:
    """Every argument given is a tensor. The public wrappers check this before choosing a
    path, so that both raise this TypeError (the dispatcher's own names no argument)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def check_dim(t: torch.Tensor, dim: int, op: str, name: str, shape: str) -> None:
    check(t.dim() == dim, op, lambda: f"{name} must be {dim}-d {shape}, got {t.dim()}-d tensor "
                                      f"of shape {sizes(t.shape)}")


def check_same_device(a: torch.Tensor, b: torch.Tensor, op: str, name_a: str, name_b: str) -> None:
    check(a.device == b.device, op,
          lambda: f"{name_b} must be on the same device as {name_a} ({a.device}), got {b.device}")


def check_dtype(t: torch.Tensor, dtype: torch.dtype, op: str, name: str) -> None:
    check(t.dtype == dtype, op,
          lambda: f"{name} must have dtype {scalar_type(dtype)}, got {scalar_type(t.dtype)}")


def check_floating(t: torch.Tensor, op: str, name: str) -> None:
    check(t.is_floating_point(), op,
          lambda: f"{name} must be a floating-point tensor, got {scalar_type(t.dtype)}")


def readable(t: torch.Tensor) -> bool:
    """Whether value-dependent checks read `t`: the kernels read only CPU tensors (on CUDA a
    read would force a host sync), and a fake or meta tensor has no data."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)
