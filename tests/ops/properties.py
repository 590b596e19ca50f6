"""Hypothesis strategies and the compiled-vs-reference property shared by the op tests: on
any input (shapes, dtypes, values with inf / NaN / huge / degenerate entries), the compiled
op and its reference give the same values or raise the same named error."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import codetr

# Derandomized: CI runs the same examples every time; a failure is reproducible as is.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])

SPECIAL = [0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, -1e30, math.inf, -math.inf, math.nan]


def values(lo: float, hi: float, special: bool = True):
    """Floats in [lo, hi], and (when `special`) the special values about a fifth of the time."""
    regular = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    return st.one_of(regular, st.sampled_from(SPECIAL)) if special else regular


def tensors(draw, shape, elements, dtype=torch.float32) -> torch.Tensor:
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=dtype).view(shape)


def boxes(draw, n: int, special: bool = True, dtype=torch.float32) -> torch.Tensor:
    """[n, 4] boxes: mostly well-formed (x2 >= x1), some degenerate or inverted, and special
    coordinates when `special`."""
    xy = tensors(draw, (n, 2), values(-10, 50, special), dtype)
    wh = tensors(draw, (n, 2), values(-2, 30, special), dtype)
    return torch.cat([xy, xy + wh], -1)


def run(path: str, fn, args, kwargs=None):
    """fn(*args) on one path: ("out", outputs) or ("error", type name, message)."""
    codetr.ops.set_ops_mode(path)
    try:
        out = fn(*args, **(kwargs or {}))
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    finally:
        codetr.ops.set_ops_mode("auto")
    return ("out", out if isinstance(out, (tuple, list)) else (out,))


def assert_paths_agree(fn, args, kwargs=None, rtol=1e-5, atol=1e-5):
    """The compiled and the reference path of fn agree on (args, kwargs)."""
    compiled, reference = run("compiled", fn, args, kwargs), run("reference", fn, args, kwargs)
    assert compiled[0] == reference[0], (compiled, reference)
    if compiled[0] == "error":
        assert compiled == reference
        return
    for c, r in zip(compiled[1], reference[1]):
        assert c.shape == r.shape and c.dtype == r.dtype, (c, r)
        if c.is_floating_point():
            torch.testing.assert_close(c, r, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert torch.equal(c, r), (c, r)
