"""box_iou: torchvision parity (IoU, GIoU), brute-force IoF and eps rules, broadcasting,
aligned mode, gradients of the compiled backward op, registration and bad inputs."""
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torchvision

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import box_iou, box_iou_reference

OP = "box_iou"


@pytest.fixture(params=["compiled", "reference"])
def path(request, assert_compiled):
    """Runs a test on both paths: the compiled kernel (asserted to be in use) and the
    pure-PyTorch reference."""
    if request.param == "compiled":
        assert_compiled(OP)
        yield "compiled"
    else:
        codetr.ops.set_ops_mode("reference")
        try:
            assert codetr.ops.extension_info()["ops"][OP]["cpu"] == "reference"
            yield "reference"
        finally:
            codetr.ops.set_ops_mode("auto")


def random_boxes(*shape, scale=100.0, dtype=torch.float32, seed=0, min_size=1.0):
    """[*shape, 4] valid boxes (x1 < x2, y1 < y2) with sides in [min_size, scale / 2]."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * (scale / 2 - min_size) + min_size
    return torch.cat([xy, xy + wh], -1).to(dtype)


def integer_boxes(*shape, seed=0, size=12):
    """Boxes on a small integer grid: many shared edges, equal coordinates, touching and
    zero-area boxes (the tie cases of max/min/clamp)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, size, (*shape, 2), generator=g)
    wh = torch.randint(0, size // 2, (*shape, 2), generator=g)
    return torch.cat([xy, xy + wh], -1).double()


def brute_force(b1, b2, mode, eps):
    """One pair at a time in Python floats, from the stated rules (mmdetection's)."""
    out = torch.empty(len(b1), len(b2), dtype=torch.float64)
    for i, (ax1, ay1, ax2, ay2) in enumerate(b1.tolist()):
        for j, (bx1, by1, bx2, by2) in enumerate(b2.tolist()):
            w = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
            h = max(min(ay2, by2) - max(ay1, by1), 0.0)
            inter = w * h
            area_a = (ax2 - ax1) * (ay2 - ay1)
            area_b = (bx2 - bx1) * (by2 - by1)
            union = max(area_a if mode == "iof" else area_a + area_b - inter, eps)
            value = inter / union
            if mode == "giou":
                enclose = max(max(max(ax2, bx2) - min(ax1, bx1), 0) * max(max(ay2, by2) - min(ay1, by1), 0), eps)
                value -= (enclose - union) / enclose
            out[i, j] = value
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape1,shape2", [((300,), (20,)), ((2, 300), (2, 20)), ((1000,), (1,)), ((3, 7), (3, 64))])
def test_matches_torchvision(shape1, shape2, dtype, tol, path):
    b1 = random_boxes(*shape1, dtype=dtype, seed=1)
    b2 = random_boxes(*shape2, dtype=dtype, seed=2)
    iou = box_iou(b1, b2)
    assert iou.shape == (*shape1, shape2[-1]) and iou.dtype == dtype
    torch.testing.assert_close(iou, torchvision.ops.box_iou(b1, b2), rtol=tol, atol=tol)
    giou = box_iou(b1, b2, mode="giou")
    torch.testing.assert_close(giou, torchvision.ops.generalized_box_iou(b1, b2), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
@pytest.mark.parametrize("kind", ["random", "integer"])
def test_matches_brute_force_with_eps_rules(mode, kind, path):
    if kind == "random":
        b1, b2 = random_boxes(40, dtype=torch.float64, seed=3), random_boxes(30, dtype=torch.float64, seed=4)
    else:  # shared edges, touching and zero-area boxes
        b1, b2 = integer_boxes(40, seed=3), integer_boxes(30, seed=4)
        assert ((b1[:, 2] == b1[:, 0]) | (b1[:, 3] == b1[:, 1])).any()
    eps = 1e-6
    out = box_iou(b1, b2, mode=mode, eps=eps)
    torch.testing.assert_close(out, brute_force(b1, b2, mode, eps), rtol=1e-12, atol=1e-12)
    aligned = box_iou(b1[:30], b2, mode=mode, aligned=True, eps=eps)
    torch.testing.assert_close(aligned, out[:30].diagonal(), rtol=1e-12, atol=1e-12)


def test_degenerate_boxes_are_finite(path):
    """Zero-area boxes (points, lines, identical points, all zeros) never give NaN."""
    degenerate = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 0], [5, 5, 5, 5], [2, 3, 8, 3], [4, 1, 4, 9]],
                              dtype=torch.float32)
    normal = torch.tensor([[0, 0, 10, 10], [5, 5, 5, 5]], dtype=torch.float32)
    for mode in ("iou", "iof", "giou"):
        out = box_iou(degenerate, torch.cat([degenerate, normal]), mode=mode)
        assert torch.isfinite(out).all(), (mode, out)
        torch.testing.assert_close(out.double(), brute_force(degenerate, torch.cat([degenerate, normal]), mode, 1e-6),
                                   rtol=1e-5, atol=1e-6)
        aligned = box_iou(degenerate, degenerate, mode=mode, aligned=True)
        assert torch.isfinite(aligned).all()
    # Identical points: no intersection, union clamped to eps -> IoU 0, GIoU 0.
    point = degenerate[:1]
    assert box_iou(point, point).item() == 0.0 and box_iou(point, point, mode="giou").item() == 0.0


@pytest.mark.parametrize("mode", ["iou", "giou"])
def test_huge_coordinates(mode, path):
    """Coordinates up to 1e7 (areas ~1e13) in float32 keep float32 relative accuracy."""
    b1 = random_boxes(50, scale=1e7, dtype=torch.float64, seed=5, min_size=1e5)
    b2 = random_boxes(20, scale=1e7, dtype=torch.float64, seed=6, min_size=1e5)
    out = box_iou(b1.float(), b2.float(), mode=mode)
    torch.testing.assert_close(out.double(), box_iou_reference(b1.float().double(), b2.float().double(), mode=mode),
                               rtol=1e-4, atol=1e-5)


def test_broadcasting_batch_dimensions(path):
    b1 = random_boxes(3, 1, 17, seed=7)
    b2 = random_boxes(2, 9, seed=8)
    for mode in ("iou", "iof", "giou"):
        out = box_iou(b1, b2, mode=mode)
        assert out.shape == (3, 2, 17, 9)
        for i in range(3):
            for j in range(2):
                torch.testing.assert_close(out[i, j], box_iou_reference(b1[i, 0], b2[j], mode=mode))
    # aligned: [4, N] against [N] boxes
    b1 = random_boxes(4, 11, seed=9)
    b2 = random_boxes(11, seed=10)
    out = box_iou(b1, b2, mode="giou", aligned=True)
    assert out.shape == (4, 11)
    for i in range(4):
        torch.testing.assert_close(out[i], box_iou_reference(b1[i], b2, mode="giou").diagonal())


def test_non_contiguous_inputs(path):
    b1 = random_boxes(4, 33, seed=11)
    b2 = random_boxes(4, 12, seed=12)
    b1_nc = b1.transpose(0, 1).contiguous().transpose(0, 1)
    b2_nc = torch.stack([b2, b2], -1)[..., 1]
    assert not (b1_nc.is_contiguous() or b2_nc.is_contiguous())
    for mode in ("iou", "giou"):
        torch.testing.assert_close(box_iou(b1_nc, b2_nc, mode=mode), box_iou_reference(b1, b2, mode=mode),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("aligned", [False, True])
def test_empty_inputs(aligned, path):
    cases = [((0, 4), (0, 4))] if aligned else [((0, 4), (5, 4)), ((5, 4), (0, 4)), ((2, 0, 4), (2, 3, 4))]
    cases += [((0, 3, 4), (3, 4))]
    for s1, s2 in cases:
        b1, b2 = torch.rand(s1), torch.rand(s2)
        if aligned:
            b2 = torch.rand(*s2[:-2], s1[-2], 4)
        for mode in ("iou", "iof", "giou"):
            out = box_iou(b1, b2, mode=mode, aligned=aligned)
            batch = torch.broadcast_shapes(b1.shape[:-2], b2.shape[:-2])
            expect = (*batch, b1.shape[-2]) if aligned else (*batch, b1.shape[-2], b2.shape[-2])
            assert out.shape == expect and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_reduced_precision_and_integer_inputs_computed_in_fp32(dtype, path):
    b1 = random_boxes(64, dtype=torch.float64, seed=13).to(dtype)
    b2 = random_boxes(16, dtype=torch.float64, seed=14).to(dtype)
    for mode in ("iou", "iof", "giou"):
        out = box_iou(b1, b2, mode=mode)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, box_iou_reference(b1.float(), b2.float(), mode=mode), rtol=1e-6, atol=1e-6)


def test_fp32_under_autocast(path):
    b1 = random_boxes(64, seed=15).bfloat16()
    b2 = random_boxes(16, seed=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = box_iou(b1, b2, mode="giou")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, box_iou_reference(b1.float(), b2, mode="giou"))


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("kind", ["random", "integer"])
def test_backward_matches_autograd_of_reference(mode, aligned, kind, assert_compiled):
    """The analytic backward op against autograd through mmdetection's formula, including
    ties of max/min/clamp (integer boxes share edges and corners)."""
    assert_compiled(OP)
    if kind == "random":
        b1, b2 = random_boxes(2, 25, dtype=torch.float64, seed=17), random_boxes(2, 25 if aligned else 7, dtype=torch.float64, seed=18)
    else:
        b1, b2 = integer_boxes(2, 25, seed=17), integer_boxes(2, 25 if aligned else 7, seed=18)
    b1.requires_grad_()
    b2.requires_grad_()
    out = box_iou(b1, b2, mode=mode, aligned=aligned)
    ref = box_iou_reference(b1, b2, mode=mode, aligned=aligned)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    g_out = torch.autograd.grad(out, (b1, b2), grad)
    g_ref = torch.autograd.grad(ref, (b1, b2), grad)
    for name, a, b in zip(("boxes1", "boxes2"), g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_backward_is_deterministic_across_thread_counts(assert_compiled, at_thread_counts):
    assert_compiled(OP)
    b1, b2 = random_boxes(1, 3000, seed=19), random_boxes(1, 40, seed=20)
    grad = torch.randn(1, 3000, 40)
    results = at_thread_counts(
        lambda: torch.ops.codetr.box_iou_backward(grad, b1, b2, "giou", False, 1e-6))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_gradcheck(mode, assert_compiled):
    assert_compiled(OP)
    b1 = random_boxes(2, 6, dtype=torch.float64, seed=21).requires_grad_()
    b2 = random_boxes(2, 5, dtype=torch.float64, seed=22).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: box_iou(a, b, mode=mode), (b1, b2))
    b3 = random_boxes(2, 6, dtype=torch.float64, seed=23).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: box_iou(a, b, mode=mode, aligned=True), (b1, b3))


def test_opcheck(assert_compiled):
    assert_compiled(OP)
    for dtype in (torch.float32, torch.float64):
        b1 = random_boxes(2, 9, dtype=dtype, seed=24).requires_grad_()
        b2 = random_boxes(2, 5, dtype=dtype, seed=25).requires_grad_()
        b3 = random_boxes(2, 9, dtype=dtype, seed=26).requires_grad_()
        for mode in ("iou", "iof", "giou"):
            torch.library.opcheck(torch.ops.codetr.box_iou.default, (b1, b2, mode, False, 1e-6))
            torch.library.opcheck(torch.ops.codetr.box_iou.default, (b1, b3, mode, True, 1e-6))
        grad = torch.randn(2, 9, 5, dtype=dtype)
        torch.library.opcheck(torch.ops.codetr.box_iou_backward.default,
                              (grad, b1.detach(), b2.detach(), "giou", False, 1e-6))


def test_torch_compile_fullgraph(assert_compiled):
    assert_compiled(OP)
    b1 = random_boxes(2, 30, seed=27).requires_grad_()
    b2 = random_boxes(2, 6, seed=28)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def cost(a, b):  # the Hungarian matcher's GIoU cost, per image
        return -box_iou(a, b, mode="giou")

    out = cost(b1, b2)
    torch.testing.assert_close(out, -box_iou_reference(b1, b2, mode="giou"))
    out.sum().backward()
    (g_ref,) = torch.autograd.grad(-box_iou_reference(b1, b2, mode="giou").sum(), b1)
    torch.testing.assert_close(b1.grad, g_ref)


def test_reference_path_selected(reference_mode):
    info = codetr.ops.extension_info()
    assert info["mode"] == "reference" and info["ops"][OP]["cpu"] == "reference"
    b1, b2 = random_boxes(10, seed=29), random_boxes(4, seed=30)
    torch.testing.assert_close(box_iou(b1, b2), torchvision.ops.box_iou(b1, b2))


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


@pytest.mark.parametrize("args,match", [
    ((torch.rand(5, 4), torch.rand(1, 4, 4), "iou", False, 1e-6), r"boxes1 must be 3-d \[B, N, 4\]"),
    ((torch.rand(1, 5, 4), torch.rand(1, 4, 3), "iou", False, 1e-6), r"boxes2 must be \[B, M, 4\] with 4 coordinates"),
    ((torch.rand(1, 5, 4).half(), torch.rand(1, 4, 4).half(), "iou", False, 1e-6), "boxes1 must be float32 or float64"),
    ((torch.rand(1, 5, 4), torch.rand(1, 4, 4).double(), "iou", False, 1e-6), "boxes2 must have the dtype of boxes1"),
    ((torch.rand(2, 5, 4), torch.rand(1, 4, 4), "iou", False, 1e-6), r"boxes2 must be \[B, M, 4\] with B = 2"),
    ((torch.rand(1, 5, 4), torch.rand(1, 4, 4), "iou", True, 1e-6), "boxes2 must hold as many boxes"),
    ((torch.rand(1, 5, 4), torch.rand(1, 4, 4), "ciou", False, 1e-6), "mode must be"),
])
def test_compiled_op_checks_arguments(args, match, assert_compiled):
    assert_compiled(OP)
    kernel, fake = malformed_cases.kernel_and_fake_errors(torch.ops.codetr.box_iou, *args)
    assert kernel is not None and re.search(match, kernel), kernel
    assert fake == kernel


def test_compiled_backward_checks_grad(assert_compiled):
    assert_compiled(OP)
    with pytest.raises(RuntimeError, match=r"grad must be \[B, N, M\] = \[1, 5, 4\]"):
        torch.ops.codetr.box_iou_backward(torch.rand(1, 5), torch.rand(1, 5, 4), torch.rand(1, 4, 4), "iou", False, 1e-6)


@st.composite
def box_iou_inputs(draw):
    N, M = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    aligned = draw(st.booleans())
    if aligned:
        M = N
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    return (boxes(draw, N, special, dtype), boxes(draw, M, special, dtype),
            draw(st.sampled_from(["iou", "iof", "giou"])), aligned)


@PROPERTY_SETTINGS
@given(box_iou_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    b1, b2, mode, aligned = inputs
    assert_paths_agree(box_iou, (b1, b2), {"mode": mode, "aligned": aligned}, rtol=1e-5, atol=1e-6)
