"""The CUDA kernels against the pure-PyTorch references (run on the CPU in float64, an
independent truth), and the model and trainer on a GPU.

Skipped where no GPU is visible (our CPU machines and CI): there the CUDA sources are
compiled and linked on every submission (.ci/run), and their per-element arithmetic is the
CPU kernels' (csrc/*/*_kernel.h), which the CPU tests cover. scripts/gpu_check.sh runs this
file on a GPU machine.
"""
import pytest
import torch

from codetr.ops import (atss_assign, atss_assign_reference, batched_nms, batched_nms_reference, box_iou,
                        box_iou_reference, generalized_box_iou_loss, generalized_box_iou_loss_reference,
                        max_iou_assign, max_iou_assign_reference, ms_deform_attn, ms_deform_attn_reference, nms,
                        nms_reference, roi_align, roi_align_reference)
from assign_cases import grid_anchors, random_gts
from test_box_iou import random_boxes
from test_ms_deform_attn import border_locations, make_inputs, random_config
from test_nms import detections
from test_roi_align import make_rois

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


def cuda(*tensors):
    return [t.to(CUDA) for t in tensors]


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# ---------------------------------------------------------------- multi-scale deformable attention

@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_ms_deform_attn_matches_reference(seed, dtype, tol, assert_compiled):
    assert_compiled("ms_deform_attn", CUDA)
    cfg = random_config(seed)
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float64, seed=seed, **cfg)
    on_grid = seed % 3 == 0
    if on_grid:
        loc = border_locations(cfg["levels"], cfg["N"], cfg["Q"], cfg["M"], cfg["P"], torch.float64)
    if seed % 4 == 1:  # non-contiguous value and locations
        value = value.transpose(1, 2).contiguous().transpose(1, 2)
        loc = loc.flip(-1).contiguous().flip(-1)
    ref_in = [t.requires_grad_() if t.is_floating_point() else t for t in (value, shapes, starts, loc, attn)]
    ref = ms_deform_attn_reference(*ref_in)
    dev_in = [(t.detach().to(CUDA, dtype).requires_grad_() if t.is_floating_point() else t.to(CUDA)) for t in ref_in]
    out = ms_deform_attn(*dev_in)
    assert out.device.type == CUDA and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
    grad = torch.randn(ref.shape, dtype=torch.float64)
    g_ref = grads(ref, (ref_in[0], ref_in[3], ref_in[4]), grad)
    g_out = grads(out, (dev_in[0], dev_in[3], dev_in[4]), grad.to(CUDA, dtype))
    for name, a, b in zip(("value", "sampling_locations", "attention_weights"), g_out, g_ref):
        if on_grid and name == "sampling_locations":
            continue  # no derivative on the pixel grid itself
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ms_deform_attn_reduced_precision_value(dtype, assert_compiled):
    """fp16 / bf16 value with fp32 coordinates: fp32 arithmetic, grad_value accumulated in fp32."""
    assert_compiled("ms_deform_attn", CUDA)
    value, shapes, starts, loc, attn = make_inputs([(20, 30), (10, 15), (5, 8)], N=2, Q=400, M=8, D=32, P=4,
                                                  dtype=torch.float32, spread=0.05)
    value_h = value.to(dtype)
    v32 = value_h.float().requires_grad_()
    ref = ms_deform_attn_reference(v32, shapes, starts, loc, attn)
    (g_ref,) = torch.autograd.grad(ref.sum(), v32)
    vd = value_h.to(CUDA).requires_grad_()
    out = ms_deform_attn(vd, *cuda(shapes, starts, loc, attn))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)
    (g,) = torch.autograd.grad(out.float().sum(), vd)
    assert g.dtype == dtype
    # Each value row receives up to Q L P contributions: fp32 accumulation keeps the sum to
    # one final rounding, within 2 % of the fp32 reference.
    torch.testing.assert_close(g.float().cpu(), g_ref, rtol=2e-2, atol=2e-2 * g_ref.abs().max().item())


def test_ms_deform_attn_encoder_sized_matches_cpu_kernel(assert_compiled):
    """Case C's shapes (5440 queries on 4 levels) with the benchmark's sampling: the CUDA
    kernel agrees with the CPU kernel, itself checked against the reference in tests/ops."""
    assert_compiled("ms_deform_attn", CUDA)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_ms_deform_attn import make_inputs as benchmark_case

    inputs = [t.double() if t.is_floating_point() else t for t in benchmark_case("C", torch.device("cpu"))]
    value = inputs[0].requires_grad_()
    out_cpu = ms_deform_attn(value, *inputs[1:])
    grad = torch.randn_like(out_cpu)
    (g_cpu,) = torch.autograd.grad(out_cpu, value, grad)
    vd = value.detach().to(CUDA).requires_grad_()
    out = ms_deform_attn(vd, *cuda(*inputs[1:]))
    (g,) = torch.autograd.grad(out, vd, grad.to(CUDA))
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g.cpu(), g_cpu, rtol=1e-10, atol=1e-10)


def test_ms_deform_attn_opcheck_and_errors(assert_compiled):
    assert_compiled("ms_deform_attn", CUDA)
    value, shapes, starts, loc, attn = cuda(*make_inputs([(6, 7), (3, 4)], dtype=torch.float32))
    torch.library.opcheck(torch.ops.codetr.ms_deform_attn.default, (value, shapes, starts, loc, attn))
    with pytest.raises(RuntimeError, match="same device"):
        ms_deform_attn(value, shapes, starts, loc.cpu(), attn)


def test_ms_deform_attn_module_on_cuda_matches_cpu(assert_compiled):
    assert_compiled("ms_deform_attn", CUDA)
    from codetr.models import MSDeformAttn

    torch.manual_seed(0)
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=3).double()
    shapes = torch.tensor([[8, 10], [4, 5]])
    starts = torch.tensor([0, 80])
    query = torch.randn(2, 30, 64, dtype=torch.float64)
    ref_points = torch.rand(2, 30, 2, 2, dtype=torch.float64)
    src = torch.randn(2, 100, 64, dtype=torch.float64)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[1, 70:80] = True
    out_cpu = m(query, ref_points, src, shapes, starts, mask)
    out_cpu.sum().backward()
    g_cpu = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.to(CUDA)
    out = m(*cuda(query, ref_points, src, shapes, starts, mask))
    out.sum().backward()
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), g_cpu[n], rtol=1e-9, atol=1e-9, msg=lambda s: f"{n}: {s}")


# ---------------------------------------------------------------- boxes

@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
@pytest.mark.parametrize("aligned", [False, True])
def test_box_iou_matches_reference(mode, aligned, assert_compiled):
    assert_compiled("box_iou", CUDA)
    b1 = random_boxes(2, 300, dtype=torch.float64, seed=1)
    b2 = random_boxes(2, 300 if aligned else 20, dtype=torch.float64, seed=2)
    b1[0, :5] = b1[0, 5:10]  # shared edges and equal boxes
    b1.requires_grad_()
    b2.requires_grad_()
    ref = box_iou_reference(b1, b2, mode, aligned)
    d1, d2 = (b.detach().to(CUDA).requires_grad_() for b in (b1, b2))
    out = box_iou(d1, d2, mode, aligned)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    for a, b in zip(grads(out, (d1, d2), grad.to(CUDA)), grads(ref, (b1, b2), grad)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
    out32 = box_iou(d1.detach().float(), d2.detach().float(), mode, aligned)
    torch.testing.assert_close(out32.cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_giou_loss_matches_reference(reduction, assert_compiled):
    assert_compiled("generalized_box_iou_loss", CUDA)
    pred = random_boxes(1000, dtype=torch.float64, seed=3).requires_grad_()
    target = random_boxes(1000, dtype=torch.float64, seed=4).requires_grad_()
    ref = generalized_box_iou_loss_reference(pred, target, reduction)
    dp, dt = (b.detach().to(CUDA).requires_grad_() for b in (pred, target))
    out = generalized_box_iou_loss(dp, dt, reduction)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    for a, b in zip(grads(out, (dp, dt), grad.to(CUDA)), grads(ref, (pred, target), grad)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K,ties", [(500, False), (800, True), (5000, False)])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_matches_reference(K, ties, threshold, assert_compiled):
    assert_compiled("nms", CUDA)
    boxes, scores, _ = detections(K, seed=K, ties=ties, degenerate=ties)
    keep = nms(*cuda(boxes, scores), threshold)
    assert keep.device.type == CUDA
    assert torch.equal(keep.cpu(), nms_reference(boxes, scores, threshold))


def test_batched_nms_matches_reference(assert_compiled):
    assert_compiled("batched_nms", CUDA)
    boxes, scores, idxs = detections(3000, seed=5, ties=True, classes=80)
    keep = batched_nms(*cuda(boxes, scores, idxs), 0.5)
    # On the reference's CUDA path: torchvision orders equal scores differently per device.
    assert torch.equal(keep, batched_nms_reference(*cuda(boxes, scores, idxs), 0.5))


# ---------------------------------------------------------------- assignment

@pytest.mark.parametrize("G,counts", [(30, (30, 12)), (200, (200, 0))])
def test_atss_assign_matches_reference(G, counts, assert_compiled):
    """T1's sizes: an 800x1333 image's 5 levels (22300 anchors)."""
    assert_compiled("atss_assign", CUDA)
    g = torch.Generator().manual_seed(G)
    anchors, levels = grid_anchors(800, 1333)
    gts = random_gts(g, 2, G, 800, 1333)
    counts = torch.tensor(counts)
    want = atss_assign_reference(anchors, levels, gts, counts)
    got = atss_assign(*cuda(anchors), levels, *cuda(gts, counts))
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1].to(got[1].dtype), rtol=0, atol=0, equal_nan=True)
    assert int((got[0][0] > 0).sum()) > 100


@pytest.mark.parametrize("preset", [(0.7, 0.3, 0.3, True, True), (0.5, 0.5, 0.5, False, True),
                                    (0.5, (0.1, 0.4), 0.3, True, False)])
def test_max_iou_assign_matches_reference(preset, assert_compiled):
    assert_compiled("max_iou_assign", CUDA)
    g = torch.Generator().manual_seed(11)
    priors, _ = grid_anchors(384, 512, strides=(8, 16, 32, 64), scales=(4.0,), ratios=(0.5, 1.0, 2.0))
    gts = random_gts(g, 3, 40, 384, 512, min_side=4)
    counts = torch.tensor([40, 7, 0])
    want = max_iou_assign_reference(priors, gts, counts, *preset)
    got = max_iou_assign(*cuda(priors, gts, counts), *preset)
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1].to(got[1].dtype), rtol=0, atol=0, equal_nan=True)
    assert (got[0] > 0).any()


# ---------------------------------------------------------------- RoIAlign

@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_roi_align_matches_reference(aligned, sampling_ratio, assert_compiled):
    assert_compiled("roi_align", CUDA)
    g = torch.Generator().manual_seed(sampling_ratio + 5)
    x = torch.randn(2, 33, 20, 26, generator=g, dtype=torch.float64, requires_grad=True)
    rois = make_rois(g, 64, 2, 80, 104, torch.float64)
    ref = roi_align_reference(x, rois, (7, 7), 0.25, sampling_ratio, aligned)
    xd = x.detach().to(CUDA).requires_grad_()
    out = roi_align(xd, rois.to(CUDA), (7, 7), 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    (gd,) = grads(out, (xd,), grad.to(CUDA))
    (gr,) = grads(ref, (x,), grad)
    torch.testing.assert_close(gd.cpu(), gr, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- model and trainer

@pytest.mark.parametrize("heads", [("atss", "retina", "fcos"), ("rcnn",)])
def test_co_detr_on_cuda_matches_cpu(heads, monkeypatch, assert_compiled):
    """The same Co-DETR on both devices, float64: losses and gradients agree, so every op and
    index path of the model runs correctly on CUDA. The R-CNN head alone, more loosely: its
    RPN scores are fp32 sigmoids with ties, which torchvision's NMS semantics order
    differently per device, so it may sample other RoIs among equals."""
    for op in ("ms_deform_attn", "atss_assign", "max_iou_assign", "roi_align", "batched_nms"):
        assert_compiled(op, CUDA)
    from codetr.config import build_model
    from test_co_detr import SMALL, C, _batch

    randperm = torch.randperm  # the heads' random sampling: the same draws on both devices
    monkeypatch.setattr(torch, "randperm", lambda n, device=None, **kw: randperm(n, **kw).to(device))

    torch.manual_seed(0)
    model = build_model("deformable_detr_pp_lite0", C, aux_heads=heads, **SMALL).double().train()
    with torch.no_grad():  # off the structured init: its integer sampling offsets put thousands of
        for p in model.parameters():  # samples exactly on pixel grid lines, where bilinear sampling
            p.add_(torch.randn_like(p), alpha=0.01)  # has no derivative and each device picks a side
    images, masks, targets = _batch()
    images = images.double()
    targets = [{k: (v.double() if v.is_floating_point() else v) for k, v in t.items()} for t in targets]

    def losses_and_grads(device):
        model.to(device).zero_grad()
        tg = [{k: v.to(device) for k, v in t.items()} for t in targets]
        torch.manual_seed(3)
        losses = model(images.to(device), masks.to(device), tg)
        sum(losses.values()).backward()
        return ({k: v.detach().cpu() for k, v in losses.items()},
                {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None})

    l_cpu, g_cpu = losses_and_grads("cpu")
    l_gpu, g_gpu = losses_and_grads(CUDA)
    exact = heads != ("rcnn",)
    assert l_cpu.keys() == l_gpu.keys()
    for k in l_cpu:
        tol = dict(rtol=1e-6, atol=1e-8) if exact else dict(rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(l_gpu[k], l_cpu[k], **tol, msg=lambda s: f"{k}: {s}")
    assert g_cpu.keys() == g_gpu.keys()
    for n in g_cpu:
        assert torch.isfinite(g_gpu[n]).all(), n
        if exact:
            torch.testing.assert_close(g_gpu[n], g_cpu[n], rtol=1e-5, atol=1e-7, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_trainer_on_cuda(tmp_path, amp, assert_compiled):
    """Six steps of the tiny K=1 run on the GPU (fp32, bf16 and fp16 with its grad scaler):
    finite losses, and a checkpoint that resumes on the GPU."""
    assert_compiled("ms_deform_attn", CUDA)
    import json
    import math

    from codetr.data import ensure_synthetic_dataset
    from codetr.engine import Trainer, load_checkpoint
    from tiny_run import tiny_config

    data = ensure_synthetic_dataset(tmp_path / "data", num_train=6, num_val=3, image_size=(96, 96), max_objects=3)
    cfg = tiny_config(data, tmp_path / "run", device=CUDA, iters=6, amp=amp)
    trainer = Trainer(cfg)
    assert next(trainer.model.parameters()).device.type == CUDA
    trainer.train()
    records = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 6 and all(math.isfinite(r["loss"]) for r in records)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    resumed = Trainer(tiny_config(data, tmp_path / "run", device=CUDA, iters=8, amp=amp, resume=True))
    assert resumed.iteration == 6
    resumed.train()
