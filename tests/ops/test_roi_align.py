"""RoIAlign (codetr.ops.roi_align) and the multi-level extractor (MultiScaleRoIAlign).

Truth: torchvision.ops.roi_align (installed for tests), gradcheck in float64, and for the
level mapping an independent per-RoI computation with Python's math module. Both the
compiled kernel and the pure-PyTorch reference are checked against it.
"""
import math

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torchvision

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import (
    MultiScaleRoIAlign, map_roi_levels, roi_align, set_ops_mode,
)

OP = "roi_align"


@pytest.fixture
def compiled():
    """The compiled CPU kernel (asserted: a silent fallback would test the reference)."""
    set_ops_mode("auto")
    assert codetr.ops.extension_info()["ops"][OP]["cpu"] == "compiled"
    yield
    set_ops_mode("auto")


@pytest.fixture
def reference():
    set_ops_mode("reference")
    assert codetr.ops.extension_info()["ops"][OP]["cpu"] == "reference"
    yield
    set_ops_mode("auto")


@pytest.fixture(params=["compiled", "reference"])
def path(request):
    """Runs a test on both paths of the public function."""
    set_ops_mode("auto" if request.param == "compiled" else "reference")
    expected = "compiled" if request.param == "compiled" else "reference"
    assert codetr.ops.extension_info()["ops"][OP]["cpu"] == expected
    yield request.param
    set_ops_mode("auto")


def make_rois(g, K, N, img_h, img_w, dtype=torch.float32):
    """[K, 5] RoIs of every kind: ordinary, partly and fully outside the image, tiny
    (< 1 pixel), degenerate (x2 < x1), huge (several times the image)."""
    kind = torch.randint(0, 6, (K,), generator=g)
    cx = torch.rand(K, generator=g) * img_w
    cy = torch.rand(K, generator=g) * img_h
    w = torch.rand(K, generator=g) * img_w * 0.6 + 0.5
    h = torch.rand(K, generator=g) * img_h * 0.6 + 0.5
    cx = torch.where(kind == 1, cx * 1.6 - 0.3 * img_w, cx)  # partly outside
    cx = torch.where(kind == 2, cx + 2.5 * img_w, cx)  # fully outside (right)
    cy = torch.where(kind == 2, -cy - 0.5 * img_h, cy)  # and above
    w = torch.where(kind == 3, w * 0.02, w)  # tiny
    h = torch.where(kind == 3, h * 0.02, h)
    w = torch.where(kind == 4, -w * 0.3, w)  # degenerate
    w = torch.where(kind == 5, w * 6, w)  # huge
    h = torch.where(kind == 5, h * 5, h)
    b = torch.randint(0, N, (K,), generator=g).float()
    rois = torch.stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return rois.to(dtype)


CASES = [
    # N, C, H, W, K, output_size, spatial_scale
    (2, 3, 11, 17, 24, (3, 4), 0.5),
    (1, 33, 9, 7, 12, 7, 0.25),  # C = 32 + 1: one full channel block and a remainder
    (3, 5, 1, 1, 10, (2, 3), 1.0),  # 1x1 maps
    (2, 2, 20, 6, 16, (5, 2), 1 / 3),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision(path, case, aligned, sampling_ratio, dtype):
    N, C, H, W, K, out_size, scale = case
    g = torch.Generator().manual_seed(hash((case, aligned, sampling_ratio)) % 2**31)
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype, requires_grad=True)
    rois = make_rois(g, K, N, H / scale, W / scale, dtype)
    expected = torchvision.ops.roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
    out = roi_align(x, rois, out_size, scale, sampling_ratio, aligned)
    # The compiled kernel follows torchvision's order of operations (bit-identical in
    # practice); the reference sums in another order.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    if path == "reference":
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert out.shape == expected.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, **tol)
    grad_out = torch.randn(expected.shape, generator=g, dtype=dtype)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    torch.testing.assert_close(grad, expected_grad, **tol)


def test_many_samples_per_bin_and_chunks(compiled):
    """A RoI with ~1,000 samples per bin and ~330,000 in all: the compiled kernels then
    precompute the samples in several chunks, which must not change the result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 50, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, -10.0, -5.0, 60.0, 45.0], [0, 3.0, 4.0, 30.0, 20.0],
                         [1, 5.0, 5.0, 9.0, 9.0]], dtype=torch.float64)
    for sr in (82, -1):
        expected = torchvision.ops.roi_align(x, rois, (7, 7), 1.0, sr, True)
        out = roi_align(x, rois, (7, 7), 1.0, sr, True)
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
        grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(out, x, grad_out)[0],
                                   torch.autograd.grad(expected, x, grad_out)[0],
                                   rtol=1e-13, atol=1e-13)


def test_backward_deterministic_across_threads(compiled, at_thread_counts):
    g = torch.Generator().manual_seed(1)
    rois = make_rois(g, 64, 2, 23 * 4, 31 * 4)
    grad_out = torch.randn(64, 40, 7, 7, generator=g)
    results = at_thread_counts(lambda: torch.ops.codetr.roi_align_backward(
        grad_out, rois, 0.25, 7, 7, 2, 40, 23, 31, 0, True))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_gradcheck(path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = make_rois(g, 6, 2, 12, 14, torch.float64)
    for aligned, sr in ((True, -1), (False, 2)):
        assert torch.autograd.gradcheck(
            lambda t: roi_align(t, rois, (2, 3), 0.5, sr, aligned), (x,), eps=1e-6, atol=1e-8)


def test_opcheck(compiled):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    rois = make_rois(g, 7, 2, 18, 16)
    torch.library.opcheck(torch.ops.codetr.roi_align.default, (x, rois, 0.5, 3, 2, 0, True))
    torch.library.opcheck(torch.ops.codetr.roi_align.default, (x, rois, 0.5, 2, 2, 2, False))
    grad_out = torch.randn(7, 4, 3, 2, generator=g)
    torch.library.opcheck(torch.ops.codetr.roi_align_backward.default,
                          (grad_out, rois, 0.5, 3, 2, 2, 4, 9, 8, 0, True))


def test_torch_compile_fullgraph(compiled):
    @torch.compile(fullgraph=True)
    def pool(x, rois):
        return roi_align(x, rois, (3, 4), 0.5, 0, True).square().sum()

    g = torch.Generator().manual_seed(4)
    for K in (9, 14):  # a second RoI count exercises the fake kernel's symbolic sizes
        x = torch.randn(2, 3, 10, 12, generator=g, requires_grad=True)
        rois = make_rois(g, K, 2, 20, 24)
        loss = pool(x, rois)
        loss.backward()
        x2 = x.detach().clone().requires_grad_()
        expected = torchvision.ops.roi_align(x2, rois, (3, 4), 0.5, 0, True).square().sum()
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x.grad, x2.grad)


def test_rois_get_no_gradient(path):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.5, 4.0, 5.0]], requires_grad=True)
    roi_align(x, rois, 2, 1.0, 2, True).sum().backward()
    assert rois.grad is None and x.grad is not None


def test_empty(path):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), (2, 3), 1.0, -1, True)
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # No channels, and an empty map (every sample outside).
    assert roi_align(torch.randn(2, 0, 5, 6), torch.tensor([[0, 1.0, 1, 3, 3]]), 2).shape == (1, 0, 2, 2)
    out = roi_align(torch.randn(1, 2, 0, 6), torch.tensor([[0, 1.0, 1, 3, 3]]), 2)
    assert torch.equal(out, torch.zeros(1, 2, 2, 2))


def test_nan_roi_pools_zeros(path):
    x = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, float("nan"), 1.0, 3.0, 3.0], [0, 1.0, 1.0, 3.0, 3.0]])
    for sr in (-1, 2):
        out = roi_align(x, rois, 2, 1.0, sr, True)
        assert torch.equal(out[0], torch.zeros(2, 2, 2))
        torch.testing.assert_close(out[1], torchvision.ops.roi_align(x, rois[1:], 2, 1.0, sr, True)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(path, dtype):
    """float16/bfloat16 input: the result is the float32 computation on the (exactly
    upcast) input, rounded once."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 12, 9, generator=g).to(dtype).requires_grad_()
    rois = make_rois(g, 11, 2, 24, 18)
    x32 = x.detach().float().requires_grad_()
    for r in (rois, rois.to(dtype)):  # float32 RoIs, or RoIs in the input's dtype
        out = roi_align(x, r, (3, 3), 0.5, 2, True)
        expected = roi_align(x32, r.float(), (3, 3), 0.5, 2, True)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
        grad_out = torch.randn(out.shape, generator=g).to(dtype)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        (expected_grad,) = torch.autograd.grad(expected, x32, grad_out.float())
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, expected_grad.to(dtype), rtol=0, atol=0)


def test_memory_layouts(path):
    """Non-contiguous and channels_last inputs and non-contiguous RoIs."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 10, 11, generator=g)
    rois = make_rois(g, 9, 2, 20, 22)
    expected = torchvision.ops.roi_align(x, rois, 3, 0.5, 0, True)
    rois_t = rois.t().contiguous().t()
    for variant in (x.contiguous(memory_format=torch.channels_last),
                    torch.randn(2, 12, 10, 11)[:, ::2].copy_(x)):
        torch.testing.assert_close(roi_align(variant, rois_t, 3, 0.5, 0, True), expected)


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


def test_backward_op_checks(compiled):
    backward = torch.ops.codetr.roi_align_backward
    rois = torch.tensor([[0, 1.0, 1, 4, 4]])
    for args, match, fake_checks in [
        ((torch.zeros(1, 3, 2, 3), rois, 1.0, 2, 2, 1, 3, 8, 8, 0, True),  # pooled 2x3, not 2x2
         r"grad_output must be \[K, C, pooled_height, pooled_width\] = \[1, 3, 2, 2\]", True),
        ((torch.zeros(1, 3, 2, 2), rois.to("meta"), 1.0, 2, 2, 1, 3, 8, 8, 0, True),
         "rois must be on the same device as grad_output", True),
        ((torch.zeros(1, 3, 2, 2), rois, 1.0, 2, 2, 1, -3, 8, 8, 0, True),
         "input sizes .* must be non-negative", True),
        ((torch.zeros(1, 3, 2, 2), rois + torch.tensor([1.0, 0, 0, 0, 0]), 1.0, 2, 2, 1, 3, 8, 8,
          0, True), r"rois\[:, 0\] must hold batch indices", False),  # index 1, batch_size 1
    ]:
        kernel, fake = malformed_cases.kernel_and_fake_errors(backward, *args)
        assert kernel is not None and re.search(match, kernel), kernel
        assert fake == (kernel if fake_checks else None)  # a fake tensor has no batch indices


# ----------------------------------------------------------------------------------------
# MultiScaleRoIAlign


def _level(box, num_levels, finest_scale):
    """mmdetection's rule, evaluated per RoI with the math module."""
    x1, y1, x2, y2 = box
    scale = math.sqrt((x2 - x1) * (y2 - y1))
    return min(max(math.floor(math.log2(scale / finest_scale + 1e-6)), 0), num_levels - 1)


def test_map_roi_levels():
    g = torch.Generator().manual_seed(7)
    sizes = torch.exp(torch.empty(200).uniform_(math.log(4), math.log(2000), generator=g))
    # plus sizes at and around the level boundaries 2^k * finest_scale
    sizes = torch.cat([sizes, torch.tensor([111.9, 112.0, 112.1, 224.0, 447.9, 448.0, 896.0, 1e4])])
    ratio = torch.exp(torch.empty(sizes.numel()).uniform_(-1, 1, generator=g))
    x1 = torch.rand(sizes.numel(), generator=g) * 100
    y1 = torch.rand(sizes.numel(), generator=g) * 100
    boxes = torch.stack([x1, y1, x1 + sizes * ratio.sqrt(), y1 + sizes / ratio.sqrt()], 1).double()
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), boxes], 1)
    for num_levels, finest in ((4, 56.0), (5, 112.0), (1, 56.0)):
        expected = torch.tensor([_level(b.tolist(), num_levels, finest) for b in boxes])
        assert torch.equal(map_roi_levels(rois, num_levels, finest), expected)
        assert torch.equal(map_roi_levels(boxes, num_levels, finest), expected)  # [K, 4] too
    assert map_roi_levels(torch.tensor([[0, 5.0, 5, 4, 9]]), 4).tolist() == [0]  # negative area


def _pyramid(N, C, strides, img, g, dtype=torch.float32):
    return [torch.randn(N, C, math.ceil(img[0] / s), math.ceil(img[1] / s), generator=g,
                        dtype=dtype, requires_grad=True) for s in strides]


def _proposals(g, K, N, img):
    size = torch.exp(torch.empty(K).uniform_(math.log(8), math.log(600), generator=g))
    ratio = torch.exp(torch.empty(K).uniform_(-1, 1, generator=g))
    cx, cy = torch.rand(K, generator=g) * img[1], torch.rand(K, generator=g) * img[0]
    w, h = size * ratio.sqrt(), size / ratio.sqrt()
    b = torch.randint(0, N, (K,), generator=g).float()
    return torch.stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def test_multiscale_matches_per_level_torchvision(path):
    g = torch.Generator().manual_seed(8)
    strides, img = (8, 16, 32, 64), (160, 224)
    feats = _pyramid(2, 4, strides, img, g)
    rois = _proposals(g, 40, 2, img)
    module = MultiScaleRoIAlign(output_size=(7, 6), strides=strides)
    assert not list(module.parameters())
    out = module(feats, rois)
    levels = map_roi_levels(rois, 4, 56.0)
    assert len(set(levels.tolist())) == 4  # every level is exercised
    expected = torch.zeros_like(out)
    for lvl, s in enumerate(strides):
        m = levels == lvl
        expected[m] = torchvision.ops.roi_align(feats[lvl], rois[m], (7, 6), 1 / s, 0, True)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, feats, grad_out)
    expected_grads = torch.autograd.grad(expected, feats, grad_out)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_multiscale_matches_torchvision_module(path):
    """torchvision's MultiScaleRoIAlign maps levels by floor(4 + log2(sqrt(area) / 224) +
    1e-6) on strides 4..32, i.e. finest_scale 56 (up to where 1e-6 is added) with
    aligned=False."""
    g = torch.Generator().manual_seed(9)
    strides, img = (4, 8, 16, 32), (128, 192)
    feats = _pyramid(2, 3, strides, img, g)
    rois = _proposals(g, 30, 2, img)
    ours = MultiScaleRoIAlign(7, strides, sampling_ratio=2, aligned=False, finest_scale=56)(feats, rois)
    tv = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = tv(dict(zip(["0", "1", "2", "3"], feats)), boxes, [img, img])
    # torchvision returns the RoIs image by image, in order
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(2)])
    torch.testing.assert_close(ours[order], expected)


def test_multiscale_gradcheck_and_empty_levels(path):
    g = torch.Generator().manual_seed(11)
    feats = _pyramid(2, 2, (8, 16), (48, 64), g, torch.float64)
    module = MultiScaleRoIAlign(2, strides=(8, 16))
    rois = torch.tensor([[0, 4.0, 4, 30, 20], [1, -20, -30, 110, 90], [1, 10, 5, 20, 15]],
                        dtype=torch.float64)
    assert map_roi_levels(rois, 2).tolist() == [0, 1, 0]
    assert torch.autograd.gradcheck(lambda *f: module(list(f), rois), tuple(feats), atol=1e-8)
    # Only level 0 used: level 1 gets a zero gradient.
    out = module(feats, rois[[0, 2]])
    grads = torch.autograd.grad(out.sum(), feats)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_multiscale_empty_and_errors(path):
    g = torch.Generator().manual_seed(10)
    feats = _pyramid(1, 2, (8, 16), (32, 32), g)
    module = MultiScaleRoIAlign(3, strides=(8, 16))
    out = module(feats, torch.zeros(0, 5))
    assert out.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in feats)
    with pytest.raises(ValueError, match="features"):
        module(feats[:1], torch.zeros(0, 5))
    with pytest.raises(ValueError, match="rois"):
        module(feats, torch.zeros(3, 4))


@st.composite
def roi_align_inputs(draw):
    N, C, H, W, K = (draw(st.integers(1, 2)), draw(st.integers(0, 3)), draw(st.integers(1, 6)),
                     draw(st.integers(1, 6)), draw(st.integers(0, 4)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    input = tensors(draw, (N, C, H, W), values(-3, 3, False), dtype)
    index = tensors(draw, (K, 1), st.sampled_from([0.0, 0.5, float(N - 1)] + ([float(N)] if special else [])), dtype)
    rois = torch.cat([index, boxes(draw, K, special, dtype) / 4], 1)
    output_size = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kwargs = {"spatial_scale": draw(st.sampled_from([1.0, 0.5, 0.25])),
              "sampling_ratio": draw(st.sampled_from([-1, 0, 1, 2])), "aligned": draw(st.booleans())}
    return (input, rois, output_size), kwargs


@PROPERTY_SETTINGS
@given(roi_align_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    args, kwargs = inputs
    assert_paths_agree(roi_align, args, kwargs, rtol=1e-5, atol=1e-5)
