"""ms_deform_attn: compiled kernel vs the grid_sample reference, gradients, registration."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import ms_deform_attn, ms_deform_attn_reference

OP = "ms_deform_attn"


def make_inputs(levels, N=2, Q=5, M=2, D=4, P=2, dtype=torch.float64, seed=0, spread=0.3):
    """Random inputs; locations spread beyond [0, 1] by `spread` so some fall outside."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L, S = len(shapes), int(sizes.sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = (torch.rand(N, Q, M, L, P, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread)
    attn = torch.rand(N, Q, M, L, P, generator=g, dtype=dtype)
    return value, shapes, starts, loc, attn


def random_config(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    L = r(1, 5)
    levels = [(r(1, 9), r(1, 9)) for _ in range(L)]
    D = [1, 3, 30, 32, 64, 71][seed % 6]
    return dict(levels=levels, N=[1, 3][seed % 2], Q=r(1, 12), M=r(1, 8), D=D, P=r(1, 8))


def border_locations(levels, N, Q, M, P, dtype):
    """Locations exactly on pixel centres, map borders (0, 1) and half a pixel outside."""
    shapes = torch.tensor(levels, dtype=dtype)
    L = len(levels)
    choices = torch.tensor([0.0, 1.0, -0.5, 0.5, 1.5], dtype=dtype)  # in pixels relative to edges
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, len(choices), (N, Q, M, L, P, 2), generator=g)
    frac = choices[idx]
    size = shapes.flip(-1)[None, None, None, :, None, :]  # (W, H)
    # frac 0 / 1: the border itself; -0.5: half a pixel outside; 0.5 / 1.5: pixel centres.
    pix = torch.where(idx == 1, size, frac)
    return pix / size


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_forward_backward_match_reference(seed, dtype, tol, assert_compiled):
    assert_compiled(OP)
    cfg = random_config(seed)
    value, shapes, starts, loc, attn = make_inputs(dtype=dtype, seed=seed, **cfg)
    on_grid = seed % 3 == 0
    if on_grid:  # exact borders, pixel centres and just outside
        loc = border_locations(cfg["levels"], cfg["N"], cfg["Q"], cfg["M"], cfg["P"], dtype)
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
    out = ms_deform_attn(*inputs)
    ref = ms_deform_attn_reference(*inputs)
    assert out.shape == (cfg["N"], cfg["Q"], cfg["M"] * cfg["D"])
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    wrt = (inputs[0], inputs[3], inputs[4])
    g_out = torch.autograd.grad(out, wrt, grad)
    g_ref = torch.autograd.grad(ref, wrt, grad)
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), g_out, g_ref):
        if on_grid and name == "sampling_locations":
            continue  # bilinear sampling has no derivative on the pixel grid itself
        # Location gradients scale with the map size, so compare relative to their magnitude.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("M", [3, 1])
@pytest.mark.parametrize("Q", [2, 300])
def test_both_value_layouts_of_the_cpu_kernel(Q, M, assert_compiled):
    """The CPU kernel reads value as it is when Q L P < S (few queries: Q = 2 here) and from a
    padded head-major copy otherwise (Q = 300); both against the reference, forward and
    backward, with D = 32 (the compile-time path; with M = 1 value's rows are D apart in
    either layout) and D = 5."""
    assert_compiled(OP)
    for D in (32, 5):
        value, shapes, starts, loc, attn = make_inputs([(9, 11), (5, 6), (2, 3)], N=2, Q=Q, M=M, D=D, P=2)
        assert (Q * 3 * 2 < value.shape[1]) == (Q == 2)
        inputs = [t.requires_grad_() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
        out, ref = ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(out)
        wrt = (inputs[0], inputs[3], inputs[4])
        for a, b in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(ref, wrt, grad)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, b.abs().max().item()))


def test_cpu_staging_across_sizes_and_dtypes(assert_compiled):
    """The CPU kernel stages value one head at a time in buffers of the head's padded size:
    a sequence of calls that shrink, grow and change dtype all match the reference."""
    assert_compiled(OP)
    calls = [([(9, 11), (5, 6)], torch.float64, 40), ([(3, 4)], torch.float32, 20),
             ([(12, 13), (6, 7)], torch.float32, 60), ([(9, 11), (5, 6)], torch.float64, 40)]
    for i, (levels, dtype, Q) in enumerate(calls + calls):
        value, shapes, starts, loc, attn = make_inputs(levels, N=2, Q=Q, M=2, D=32, P=2, dtype=dtype, seed=i)
        inputs = [t.requires_grad_() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
        out, ref = ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        grad = torch.randn_like(out)
        g_out = torch.autograd.grad(out, inputs[0], grad)[0]
        g_ref = torch.autograd.grad(ref, inputs[0], grad)[0]
        torch.testing.assert_close(g_out, g_ref, rtol=tol, atol=tol)


def test_non_contiguous_inputs(assert_compiled):
    assert_compiled(OP)
    value, shapes, starts, loc, attn = make_inputs([(6, 7), (3, 4), (1, 1)], N=3, Q=9, M=4, D=8, P=3)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, new strides
    loc_nc = loc.transpose(4, 5).contiguous().transpose(4, 5)
    attn_nc = torch.stack([attn, attn], -1)[..., 0]
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes, starts, loc_nc, attn_nc),
        ms_deform_attn_reference(value, shapes, starts, loc, attn),
        rtol=1e-10, atol=1e-10,
    )
    # value as a view of a head-major [N, M, S, D] tensor (the CPU kernel's own layout, which
    # it then reads without a copy), forward and backward
    value_hm = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()
    value_ref = value.clone().requires_grad_()
    out = ms_deform_attn(value_hm, shapes, starts, loc, attn)
    ref = ms_deform_attn_reference(value_ref, shapes, starts, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, value_hm, grad)[0],
                               torch.autograd.grad(ref, value_ref, grad)[0], rtol=1e-10, atol=1e-10)


def test_analytic_value_at_pixel_centres():
    """A location at a pixel centre returns that pixel, weighted by the attention."""
    value = torch.arange(12.0, dtype=torch.float64).view(1, 12, 1, 1)  # one 3x4 level
    shapes = torch.tensor([[3, 4]])
    starts = torch.tensor([0])
    x, y = 2, 1
    loc = torch.tensor([(x + 0.5) / 4, (y + 0.5) / 3], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1, 1), 0.5, dtype=torch.float64)
    assert ms_deform_attn(value, shapes, starts, loc, attn).item() == pytest.approx(0.5 * (y * 4 + x))
    # Halfway between two horizontal neighbours: their mean.
    loc[..., 0] = (x + 1.0) / 4
    assert ms_deform_attn(value, shapes, starts, loc, attn).item() == pytest.approx(0.5 * (y * 4 + x + 0.5))


def test_gradcheck(assert_compiled):
    assert_compiled(OP)
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3), (1, 1)], N=2, Q=3, M=2, D=3, P=2)
    # Keep locations off the pixel grid, where bilinear interpolation is not differentiable.
    loc = (loc + 0.013).requires_grad_()
    value.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a), (value, loc, attn)
    )


def test_opcheck(assert_compiled):
    assert_compiled(OP)
    for dtype in (torch.float32, torch.float64):
        value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 2)], dtype=dtype)
        for t in (value, loc, attn):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.codetr.ms_deform_attn.default, (value, shapes, starts, loc, attn))


def test_torch_compile_fullgraph(assert_compiled):
    assert_compiled(OP)
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 2)], dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v, l, a):
        return (ms_deform_attn(v, shapes, starts, l, a) * 2).sum()

    value.requires_grad_()
    out = f(value, loc, attn)
    out.backward()
    ref = (ms_deform_attn_reference(value.detach(), shapes, starts, loc, attn) * 2).sum()
    torch.testing.assert_close(out, ref)
    assert value.grad is not None and value.grad.abs().sum() > 0


@pytest.mark.parametrize("D,Q", [(16, 5), (32, 200)])  # the CPU kernel's two layouts, D=32 compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_value_with_fp32_coordinates(dtype, D, Q, assert_compiled):
    assert_compiled(OP)
    value, shapes, starts, loc, attn = make_inputs([(8, 9), (4, 5)], dtype=torch.float32, D=D, Q=Q)
    value_h = value.to(dtype).requires_grad_()
    out = ms_deform_attn(value_h, shapes, starts, loc, attn)
    assert out.dtype == dtype
    ref = ms_deform_attn_reference(value_h.detach().float(), shapes, starts, loc, attn)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    (g,) = torch.autograd.grad(out.float().sum(), value_h)
    assert g.dtype == dtype
    v32 = value_h.detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad(ms_deform_attn_reference(v32, shapes, starts, loc, attn).sum(), v32)
    torch.testing.assert_close(g.float(), g_ref, rtol=2e-2, atol=2e-2)


def test_backward_is_deterministic_across_thread_counts(assert_compiled, at_thread_counts):
    assert_compiled(OP)
    # Big enough for three threads (about 1e6 work units, four backward grains).
    value, shapes, starts, loc, attn = make_inputs([(16, 16), (8, 8)], N=2, Q=2000, M=4, D=8, P=4,
                                                  dtype=torch.float32, spread=0.0)
    grad = torch.randn(2, 2000, 32)
    results = at_thread_counts(
        lambda: torch.ops.codetr.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_empty_inputs():
    value, shapes, starts, loc, attn = make_inputs([(3, 4)], N=2, Q=0)
    assert ms_deform_attn(value, shapes, starts, loc, attn).shape == (2, 0, value.shape[2] * value.shape[3])
    value, shapes, starts, loc, attn = make_inputs([(3, 4)], N=0, Q=4)
    assert ms_deform_attn(value, shapes, starts, loc, attn).shape == (0, 4, value.shape[2] * value.shape[3])


def test_reference_path(reference_mode):
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 2)])
    info = codetr.ops.extension_info()
    assert info["mode"] == "reference" and info["ops"][OP]["cpu"] == "reference"
    torch.testing.assert_close(
        ms_deform_attn(value, shapes, starts, loc, attn),
        ms_deform_attn_reference(value, shapes, starts, loc, attn),
        rtol=0, atol=0,
    )


def test_env_variable_selects_reference_path():
    code = "import codetr; print(codetr.ops.extension_info()['ops']['ms_deform_attn']['cpu'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CODETR_OPS": "reference"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_baseline_instruction_set_matches_reference():
    """CODETR_CPU_ISA=baseline: the kernels compiled for the x86-64 baseline (SSE2), which
    this machine, with AVX2, would not run otherwise, pass the parity tests (in a fresh
    process, since the choice is made once)."""
    tests = "test_forward_backward_match_reference or test_both_value_layouts or reduced_precision"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", tests], env={**os.environ, "CODETR_CPU_ISA": "baseline"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_unknown_instruction_set_is_a_named_error():
    code = ("import torch, codetr.ops as o; v = torch.zeros(1, 4, 1, 2); s = torch.tensor([[2, 2]]); "
            "o.ms_deform_attn(v, s, torch.tensor([0]), torch.rand(1, 4, 1, 1, 1, 2), torch.rand(1, 4, 1, 1, 1))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CODETR_CPU_ISA": "sse9"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "CODETR_CPU_ISA must be baseline or avx2" in out.stderr


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


@pytest.mark.parametrize("changes,match", [
    (dict(grad_output=lambda g: g[:, :-1]), r"grad_output must be \[N, Q, M\*D\]"),
    (dict(grad_output=lambda g: g.double()), "grad_output must have the dtype of value"),
    (dict(grad_output=lambda g: g.to("meta")), "grad_output must be on the same device as value"),
    (dict(value=lambda v: v[0]), "ms_deform_attn_backward: value must be 4-d"),
])
def test_backward_op_checks_in_kernel_and_fake_kernel(changes, match, assert_compiled):
    assert_compiled(OP)
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 2)], dtype=torch.float32)
    args = dict(grad_output=torch.rand(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3]),
                value=value, spatial_shapes=shapes, level_start_index=starts,
                sampling_locations=loc, attention_weights=attn)
    args.update({k: f(args[k]) for k, f in changes.items()})
    kernel, fake = malformed_cases.kernel_and_fake_errors(torch.ops.codetr.ms_deform_attn_backward, *args.values())
    assert kernel is not None and re.search(match, kernel), kernel
    assert fake == kernel


# Attention weights stay at most 1 in magnitude, so sums of up to L * P * 4 terms of |value|
# <= 1e30 never overflow float32: an overflow would depend on the summation order.
_ATTN_SPECIAL = st.sampled_from([0.0, 1.0, 1e-30, math.nan])


@st.composite
def msda_inputs(draw):
    N, Q, M, D = draw(st.integers(1, 2)), draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    L, P = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    levels = [(draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(L)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = sizes.cumsum(0) - sizes
    value = tensors(draw, (N, int(sizes.sum()), M, D), values(-3, 3, special), dtype)
    loc = tensors(draw, (N, Q, M, L, P, 2), values(-0.3, 1.3, special), dtype)
    attn_values = st.one_of(values(0, 1, False), _ATTN_SPECIAL) if special else values(0, 1, False)
    attn = tensors(draw, (N, Q, M, L, P), attn_values, dtype)
    # Now and then a malformed argument: both paths must raise the same error.
    broken = draw(st.sampled_from(["none"] * 6 + ["points", "levels", "dtype", "index"]))
    if broken == "points":
        attn = attn[..., :-1]
    elif broken == "levels":
        shapes, starts = shapes[:-1], starts[:-1]
    elif broken == "dtype":
        loc = loc.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif broken == "index":
        starts = starts + 1
    return (value, shapes, starts, loc, attn), special or broken != "none"


@PROPERTY_SETTINGS
@given(msda_inputs())
def test_compiled_matches_reference_on_random_inputs(drawn):
    (value, shapes, starts, loc, attn), special = drawn
    # Summation order differs (corners, levels): cancellation of huge terms leaves up to
    # eps * the largest term.
    finite = value[value.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    eps = torch.finfo(value.dtype).eps
    assert_paths_agree(ms_deform_attn, (value, shapes, starts, loc, attn),
                       rtol=100 * eps, atol=100 * eps * max(scale, 1.0))
    if not special:  # gradients, on finite inputs
        def grads(path):
            codetr.ops.set_ops_mode(path)
            try:
                leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
                out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
                return torch.autograd.grad(out.sum(), leaves, allow_unused=True)
            finally:
                codetr.ops.set_ops_mode("auto")
        for c, r in zip(grads("compiled"), grads("reference")):
            torch.testing.assert_close(c, r, rtol=1e3 * eps, atol=1e3 * eps * max(scale, 1.0))
