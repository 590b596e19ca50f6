"""Loading of the compiled extension and the choice between compiled and reference paths.

`CODETR_OPS` (read at import, changeable with `set_ops_mode`) selects the path:
  auto       the compiled kernel where one is registered for the tensor's device, else the
             pure-PyTorch reference (the default)
  compiled   the compiled kernel; an error if it is unavailable for that device
  reference  always the pure-PyTorch reference
A missing or broken extension never breaks `import codetr`: it warns once and every op
falls back to its reference.
"""
from __future__ import annotations

import os
import warnings

import torch

MODES = ("auto", "compiled", "reference")
# Operators of the codetr library (schema names); each op module declares itself.
OPS: list[str] = []
# (op, device type) -> a compiled kernel is registered. Filled once by `declare`, so that
# `use_compiled` is a dict lookup that torch.compile can trace.
_AVAILABLE: dict[tuple[str, str], bool] = {}


def _load_extension() -> str | None:
    """Imports codetr._C (which registers torch.ops.codetr.*); returns why it failed."""
    try:
        from codetr import _C  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "codetr._C":
            return "codetr._C is not built (installed with CODETR_BUILD_EXT=0, or not compiled yet)"
        return f"codetr._C failed to load: {exc}"
    except Exception as exc:  # a broken library can raise anything at load time
        return f"codetr._C failed to load: {type(exc).__name__}: {exc}"
    return None


def _mode_from_env() -> str:
    mode = os.environ.get("CODETR_OPS", "auto")
    if mode not in MODES:
        warnings.warn(f"CODETR_OPS must be one of {MODES}, got {mode!r}; using 'auto'", stacklevel=2)
        return "auto"
    return mode


LOAD_ERROR = _load_extension()
LOADED = LOAD_ERROR is None
_mode = _mode_from_env()
if not LOADED and _mode != "reference":
    warnings.warn(f"{LOAD_ERROR}; codetr ops use their pure-PyTorch references", stacklevel=2)


def set_ops_mode(mode: str) -> None:
    """Selects "auto", "compiled" or "reference" for every op (see the module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_ops_mode() -> str:
    return _mode


def _registered(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        LOADED
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"codetr::{op}", key)
    )


def declare(op: str) -> bool:
    """Records an op of the library; returns whether its schema is registered (the
    extension loaded), i.e. whether fake kernels and autograd can be attached to it."""
    OPS.append(op)
    for dev in ("cpu", "cuda"):
        _AVAILABLE[(op, dev)] = _registered(op, dev)
    declared = LOADED and hasattr(torch.ops.codetr, op)
    # Meta tensors (shape inference, a model built on the meta device) take the op's fake
    # kernel, which validates as the kernels do and allocates the outputs.
    _AVAILABLE[(op, "meta")] = declared
    return declared


def use_compiled(op: str, device: torch.device) -> bool:
    """Whether `op` on tensors of `device` runs the compiled kernel (else the reference)."""
    if _mode == "reference":
        return False
    available = _AVAILABLE.get((op, device.type), False)
    if _mode == "compiled" and not available:
        raise RuntimeError(
            f"CODETR_OPS=compiled but codetr::{op} has no compiled kernel for {device.type}: "
            + (LOAD_ERROR or f"the extension was built without {device.type} sources")
        )
    return available


def _why(op: str, device_type: str) -> str:
    if _mode == "reference":
        return "CODETR_OPS=reference"
    if not LOADED:
        return LOAD_ERROR
    return f"codetr._C was built without {device_type} kernels for {op}"


def extension_info() -> dict:
    """Which path each op takes on each device, and why a fallback is in use.

    Returns {"torch": str, "torch_cuda": str | None, "cuda_available": bool,
    "extension_loaded": bool, "load_error": str | None, "mode": str,
    "ops": {op: {"cpu": path, "cuda": path, "cpu_reason"/"cuda_reason": str}}} where path
    is "compiled" or "reference".
    """
    ops = {}
    for op in OPS:
        entry = {}
        for dev in ("cpu", "cuda"):
            compiled = _mode != "reference" and _AVAILABLE[(op, dev)]
            entry[dev] = "compiled" if compiled else "reference"
            if not compiled:
                entry[f"{dev}_reason"] = _why(op, dev)
            elif dev == "cuda" and not torch.cuda.is_available():
                entry["cuda_reason"] = "compiled kernels present, but no CUDA device is visible"
        ops[op] = entry
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": LOADED,
        "load_error": LOAD_ERROR,
        "cuda_kernels_built": LOADED and any(_AVAILABLE[(op, "cuda")] for op in OPS),
        "mode": _mode,
        "ops": ops,
    }
