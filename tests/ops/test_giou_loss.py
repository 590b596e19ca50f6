"""generalized_box_iou_loss: torchvision's values and autograd gradients, the analytic
backward op (gradcheck), reductions, registration and bad inputs."""
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torchvision

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import generalized_box_iou_loss

OP = "generalized_box_iou_loss"
tv_loss = torchvision.ops.generalized_box_iou_loss


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


def random_pairs(K, dtype=torch.float32, seed=0, scale=100.0):
    """K (pred, target) pairs: targets random, predictions jittered copies (overlapping),
    with every fourth prediction moved far away (disjoint: the GIoU penalty term)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(K, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * scale / 2 + 1
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(K, 4, generator=g, dtype=torch.float64) * scale / 10
    pred[::4] += scale
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 0.5)
    return pred.to(dtype), target.to(dtype)


def tie_pairs():
    """Pairs where max/min/the overlap mask tie: identical boxes, shared edges, touching
    boxes, nested boxes, zero-area boxes (all on an integer grid)."""
    g = torch.Generator().manual_seed(5)
    xy = torch.randint(0, 8, (200, 2), generator=g)
    wh = torch.randint(0, 5, (200, 2), generator=g)
    boxes = torch.cat([xy, xy + wh], 1).double()
    pred, target = boxes[:100].clone(), boxes[100:].clone()
    target[:10] = pred[:10]  # identical
    target[10:20, 0] = pred[10:20, 2]  # touching on x
    return pred, target


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_values_and_gradients_match_torchvision(dtype, tol, reduction, path):
    pred, target = random_pairs(1000, dtype, seed=1)
    pred.requires_grad_()
    target.requires_grad_()
    loss = generalized_box_iou_loss(pred, target, reduction=reduction)
    ref = tv_loss(pred, target, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(loss)
    g_out = torch.autograd.grad(loss, (pred, target), grad)
    g_ref = torch.autograd.grad(ref, (pred, target), grad)
    for name, a, b in zip(("pred", "target"), g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10, msg=lambda m: f"{name}: {m}")


def test_gradients_at_ties_match_torchvision(path):
    """Ties split max/min gradients evenly, touching boxes have no intersection gradient:
    the same subgradients as autograd through torchvision's formula."""
    pred, target = tie_pairs()
    pred.requires_grad_()
    target.requires_grad_()
    loss = generalized_box_iou_loss(pred, target)
    ref = tv_loss(pred, target)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(loss)
    g_out = torch.autograd.grad(loss, (pred, target), grad)
    g_ref = torch.autograd.grad(ref, (pred, target), grad)
    for name, a, b in zip(("pred", "target"), g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_analytic_values(path):
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # identical boxes: GIoU 1, loss 0
    assert generalized_box_iou_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    # [0,2]^2 and [1,3]x[0,2]: IoU 2/6, enclosing 6 = union -> loss 1 - 1/3
    other = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert generalized_box_iou_loss(box, other).item() == pytest.approx(2 / 3, rel=1e-6)
    # disjoint [0,2]^2 and [4,6]x[0,2]: IoU 0, union 8, enclosing 12 -> loss 1 + 4/12
    far = torch.tensor([[4.0, 0.0, 6.0, 2.0]])
    assert generalized_box_iou_loss(box, far).item() == pytest.approx(1 + 1 / 3, rel=1e-6)


def test_gradcheck(assert_compiled):
    assert_compiled(OP)
    pred, target = random_pairs(24, torch.float64, seed=2)
    pred.requires_grad_()
    target.requires_grad_()
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda p, t: generalized_box_iou_loss(p, t, reduction=reduction), (pred, target))


def test_opcheck(assert_compiled):
    assert_compiled(OP)
    for dtype in (torch.float32, torch.float64):
        pred, target = random_pairs(37, dtype, seed=3)
        pred.requires_grad_()
        target.requires_grad_()
        torch.library.opcheck(torch.ops.codetr.generalized_box_iou_loss.default, (pred, target, 1e-7))
        grad = torch.randn(37, dtype=dtype)
        torch.library.opcheck(torch.ops.codetr.generalized_box_iou_loss_backward.default,
                              (grad, pred.detach(), target.detach(), 1e-7))


def test_torch_compile_fullgraph(assert_compiled):
    assert_compiled(OP)
    pred, target = random_pairs(50, seed=4)
    pred.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(p, t):
        return 2.0 * generalized_box_iou_loss(p, t, reduction="mean")

    loss = loss_fn(pred, target)
    loss.backward()
    p_ref = pred.detach().clone().requires_grad_()
    ref = 2.0 * tv_loss(p_ref, target, reduction="mean")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred.grad, p_ref.grad)


def test_empty_inputs(path):
    pred = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, 4)
    assert generalized_box_iou_loss(pred, target).shape == (0,)
    mean = generalized_box_iou_loss(pred, target, reduction="mean")
    assert mean.shape == () and mean.item() == 0.0
    mean.backward()  # still part of the graph, like torchvision's 0.0 * loss.sum()
    assert pred.grad.shape == (0, 4)
    assert generalized_box_iou_loss(pred, target, reduction="sum").item() == 0.0


def test_degenerate_and_huge_boxes(path):
    """Zero-area boxes and coordinates ~1e6: finite, and the same as torchvision."""
    pred, target = tie_pairs()
    degenerate = (pred[:, 2] == pred[:, 0]) | (pred[:, 3] == pred[:, 1])
    assert degenerate.any()
    loss = generalized_box_iou_loss(pred.float(), target.float())
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, tv_loss(pred.float(), target.float()))
    big_pred, big_target = random_pairs(500, torch.float64, seed=6, scale=1e6)
    torch.testing.assert_close(generalized_box_iou_loss(big_pred.float(), big_target.float()).double(),
                               tv_loss(big_pred, big_target), rtol=1e-4, atol=1e-4)


def test_batched_shape(path):
    pred, target = random_pairs(24, seed=7)
    loss = generalized_box_iou_loss(pred.view(2, 3, 4, 4), target.view(2, 3, 4, 4))
    assert loss.shape == (2, 3, 4)
    torch.testing.assert_close(loss.flatten(), tv_loss(pred, target))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_computed_in_fp32(dtype, path):
    pred, target = random_pairs(300, seed=8)
    pred_h = pred.to(dtype).requires_grad_()
    loss = generalized_box_iou_loss(pred_h, target.to(dtype))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, tv_loss(pred_h.detach().float(), target.to(dtype).float()))
    (g,) = torch.autograd.grad(loss.sum(), pred_h)
    assert g.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generalized_box_iou_loss(pred_h, target, reduction="sum").dtype == torch.float32


def test_reference_path_selected(reference_mode):
    info = codetr.ops.extension_info()
    assert info["ops"][OP]["cpu"] == "reference"
    pred, target = random_pairs(10, seed=9)
    torch.testing.assert_close(generalized_box_iou_loss(pred, target), tv_loss(pred, target))


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


@pytest.mark.parametrize("args,match", [
    ((torch.rand(5, 4, 1), torch.rand(5, 4), 1e-7), r"pred must be 2-d \[K, 4\]"),
    ((torch.rand(5, 4), torch.rand(4, 4), 1e-7), r"target must be \[K, 4\] with K = 5"),
    ((torch.rand(5, 4).half(), torch.rand(5, 4).half(), 1e-7), "pred must be float32 or float64"),
    ((torch.rand(5, 4), torch.rand(5, 4).double(), 1e-7), "target must have the dtype of pred"),
])
def test_compiled_op_checks_arguments(args, match, assert_compiled):
    assert_compiled(OP)
    kernel, fake = malformed_cases.kernel_and_fake_errors(torch.ops.codetr.generalized_box_iou_loss, *args)
    assert kernel is not None and re.search(match, kernel), kernel
    assert fake == kernel


def test_compiled_backward_checks_grad(assert_compiled):
    assert_compiled(OP)
    with pytest.raises(RuntimeError, match=r"grad must be \[K\] = \[5\]"):
        torch.ops.codetr.generalized_box_iou_loss_backward(torch.rand(4), torch.rand(5, 4), torch.rand(5, 4), 1e-7)


@st.composite
def giou_inputs(draw):
    K = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    return (boxes(draw, K, special, dtype), boxes(draw, K, special, dtype),
            draw(st.sampled_from(["none", "mean", "sum"])))


@PROPERTY_SETTINGS
@given(giou_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    pred, target, reduction = inputs
    assert_paths_agree(generalized_box_iou_loss, (pred, target), {"reduction": reduction},
                       rtol=1e-5, atol=1e-5)
