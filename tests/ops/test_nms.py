"""nms / batched_nms: identical kept indices, in the same order, as torchvision (ties in
score, duplicate and degenerate boxes, both batched_nms regimes), registration, bad inputs."""
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
from codetr.ops import batched_nms, batched_nms_reference, nms, nms_reference

OPS = ("nms", "batched_nms")


@pytest.fixture(params=["compiled", "reference"])
def path(request, assert_compiled):
    """Runs a test on both paths: the compiled kernels (asserted to be in use) and the
    pure-PyTorch references."""
    if request.param == "compiled":
        for op in OPS:
            assert_compiled(op)
        yield "compiled"
    else:
        codetr.ops.set_ops_mode("reference")
        try:
            assert all(codetr.ops.extension_info()["ops"][op]["cpu"] == "reference" for op in OPS)
            yield "reference"
        finally:
            codetr.ops.set_ops_mode("auto")


def detections(K, seed=0, dtype=torch.float32, ties=False, degenerate=False, dyadic=False, classes=1):
    """K clustered boxes (so that many overlap) with scores and class indices.

    ties: scores from 6 values (many equal scores); degenerate: some zero-area boxes and
    exact duplicates; dyadic: coordinates on a 1/4 grid below 1024, so that sums (the
    coordinate offsets of torchvision's batched_nms) are exact in float32.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(K // 8, 1), 2, generator=g) * 400
    c = centres[torch.randint(0, len(centres), (K,), generator=g)] + torch.randn(K, 2, generator=g) * 8
    wh = torch.rand(K, 2, generator=g) * 60 + 4
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1).clamp(min=0)
    if dyadic:
        boxes = (boxes * 4).round() / 4
    if degenerate:
        boxes[::7, 2] = boxes[::7, 0]  # zero width
        boxes[1::9, 2:] = boxes[1::9, :2]  # points
        boxes[3::11] = boxes[2::11][: len(boxes[3::11])]  # exact duplicates
    scores = torch.randint(0, 6, (K,), generator=g).float() / 5 if ties else torch.rand(K, generator=g)
    idxs = torch.randint(0, classes, (K,), generator=g)
    return boxes.to(dtype), scores.to(dtype), idxs


CASES = [
    dict(K=500, seed=1),
    dict(K=500, seed=2, ties=True),
    dict(K=800, seed=3, ties=True, degenerate=True),
    dict(K=2000, seed=4, ties=True, dtype=torch.float64),
    dict(K=1500, seed=5, degenerate=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_nms_matches_torchvision(case, threshold, path):
    boxes, scores, _ = detections(**case)
    keep = nms(boxes, scores, threshold)
    expected = torchvision.ops.nms(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, expected), (keep[:20], expected[:20])


@pytest.mark.parametrize("K,classes", [(600, 5), (1000, 80), (3000, 5), (4000, 80)])
@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_matches_torchvision(K, classes, ties, path):
    """Up to 1,000 boxes torchvision runs one nms on class-offset boxes (stable order of
    equal scores); above, nms per class and an unstable re-sort. Both orders match."""
    boxes, scores, idxs = detections(K, seed=K + classes, ties=ties, dyadic=True, classes=classes)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, expected), (keep[:20], expected[:20])


def test_batched_nms_large_class_labels_and_negative_coordinates(assert_compiled):
    """Exact per-class suppression, where torchvision's coordinate offsets would lose
    precision (labels 1e6) or overlap across classes (negative coordinates)."""
    for op in OPS:
        assert_compiled(op)
    boxes, scores, idxs = detections(700, seed=6, ties=True, classes=4)
    boxes = boxes - 200
    idxs = idxs * 1_000_000 - 1_000_000
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, batched_nms_reference(boxes, scores, idxs, 0.5))
    for c in idxs.unique():  # per class, plain nms
        members = torch.where(idxs == c)[0]
        kept_c = keep[idxs[keep] == c]
        assert torch.equal(kept_c, members[torchvision.ops.nms(boxes[members], scores[members], 0.5)])


def test_equal_scores_keep_index_order(path):
    """All scores equal, no overlaps: every box kept, in index order (stable sort)."""
    x = torch.arange(50, dtype=torch.float32) * 10
    boxes = torch.stack([x, x, x + 5, x + 5], 1)
    scores = torch.ones(50)
    assert torch.equal(nms(boxes, scores, 0.5), torch.arange(50))
    assert torch.equal(batched_nms(boxes, scores, torch.arange(50) % 3, 0.5), torch.arange(50))


def test_threshold_compared_in_double_precision(path):
    """IoU exactly float32(0.7) is not > 0.7 (torchvision compares in double)."""
    t = torch.tensor(0.7, dtype=torch.float32).item()  # 0.699999988...
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    # second box: area 1/t, inside the first... build IoU = inter / union = t exactly
    boxes[1, 2] = 1.0 / t
    iou = torchvision.ops.box_iou(boxes[:1], boxes[1:]).item()
    scores = torch.tensor([1.0, 0.5])
    for thr in (0.7, iou, iou - 1e-7, t):
        assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr)), thr


def test_empty_inputs(path):
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    for keep in (nms(boxes, scores, 0.5), batched_nms(boxes, scores, torch.zeros(0, dtype=torch.long), 0.5)):
        assert keep.shape == (0,) and keep.dtype == torch.int64
    one = nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]), 0.5)
    assert torch.equal(one, torch.tensor([0]))


def test_non_contiguous_inputs(path):
    boxes, scores, idxs = detections(400, seed=7, ties=True)
    boxes_nc = boxes.t().contiguous().t()
    scores_nc = torch.stack([scores, scores], 1)[:, 0]
    assert not (boxes_nc.is_contiguous() or scores_nc.is_contiguous())
    assert torch.equal(nms(boxes_nc, scores_nc, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_computed_in_fp32(dtype, path):
    boxes, scores, idxs = detections(500, seed=8, classes=3)
    boxes_h, scores_h = boxes.to(dtype), scores.to(dtype)
    expected = torchvision.ops.nms(boxes_h.float(), scores_h.float(), 0.5)
    assert torch.equal(nms(boxes_h, scores_h, 0.5), expected)
    expected = torchvision.ops.batched_nms(boxes_h.float(), scores_h.float(), idxs, 0.5)
    assert torch.equal(batched_nms(boxes_h, scores_h, idxs.int(), 0.5), expected)


def test_opcheck(assert_compiled):
    for op in OPS:
        assert_compiled(op)
    for dtype in (torch.float32, torch.float64):
        boxes, scores, idxs = detections(200, seed=9, dtype=dtype, classes=3)
        torch.library.opcheck(torch.ops.codetr.nms.default, (boxes, scores, 0.5))
        torch.library.opcheck(torch.ops.codetr.batched_nms.default, (boxes, scores, idxs, 0.5))


def test_torch_compile_fullgraph(assert_compiled):
    for op in OPS:
        assert_compiled(op)
    boxes, scores, idxs = detections(300, seed=10, ties=True, classes=3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def postprocess(b, s, c):
        keep = batched_nms(b, s, c, 0.6)
        return b[keep], s[keep], nms(b, s, 0.6)

    kept_boxes, kept_scores, keep_nms = postprocess(boxes, scores, idxs)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.6)
    assert torch.equal(kept_boxes, boxes[expected]) and torch.equal(kept_scores, scores[expected])
    assert torch.equal(keep_nms, torchvision.ops.nms(boxes, scores, 0.6))


def test_reference_functions_match_torchvision():
    boxes, scores, idxs = detections(300, seed=11, ties=True, degenerate=True, classes=4, dyadic=True)
    assert torch.equal(nms_reference(boxes, scores, 0.4), torchvision.ops.nms(boxes, scores, 0.4))
    assert torch.equal(batched_nms_reference(boxes, scores, idxs, 0.4),
                       torchvision.ops.batched_nms(boxes, scores, idxs, 0.4))


@pytest.mark.parametrize("case", malformed_cases.CASES["nms"], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled("nms") and assert_compiled("batched_nms")
    malformed_cases.check_case("nms", case)


@pytest.mark.parametrize("op,args,match", [
    ("nms", (torch.rand(5, 4, 1), torch.rand(5), 0.5), r"boxes must be 2-d \[K, 4\]"),
    ("nms", (torch.rand(5, 4), torch.rand(5).double(), 0.5), "scores must have the dtype of boxes"),
    ("nms", (torch.rand(5, 4).half(), torch.rand(5).half(), 0.5), "boxes must be float32 or float64"),
    ("nms", (torch.rand(5, 4), torch.rand(6), 0.5), r"scores must be \[K\] with K = 5"),
    ("batched_nms", (torch.rand(5, 4), torch.rand(5), torch.zeros(5, dtype=torch.int32), 0.5),
     "idxs must have dtype Long"),
])
def test_compiled_ops_check_arguments(op, args, match, assert_compiled):
    assert_compiled(op)
    kernel, fake = malformed_cases.kernel_and_fake_errors(getattr(torch.ops.codetr, op), *args)
    assert kernel is not None and re.search(match, kernel), kernel
    assert fake == kernel


@st.composite
def nms_inputs(draw):
    K = draw(st.integers(0, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    scores = tensors(draw, (K,), values(0, 1, special), dtype)
    threshold = draw(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, math.nan, -1.0])))
    classes = tensors(draw, (K,), st.integers(0, 2), torch.long) if draw(st.booleans()) else None
    return boxes(draw, K, special, dtype), scores, classes, threshold


@PROPERTY_SETTINGS
@given(nms_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    b, scores, classes, threshold = inputs
    if classes is None:
        assert_paths_agree(nms, (b, scores, threshold))
    else:
        assert_paths_agree(batched_nms, (b, scores, classes, threshold))
