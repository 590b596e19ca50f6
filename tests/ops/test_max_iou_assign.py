"""max_iou_assign: compiled kernel and reference against a brute-force oracle written from
mmdetection's MaxIoUAssigner rules, plus the op contract (batching, padding, empties, dtypes,
opcheck, torch.compile, argument errors)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torchvision

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import max_iou_assign, max_iou_assign_reference
from assign_cases import grid_anchors, random_gts

OP = "max_iou_assign"
# (pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality, gt_max_assign_all)
PRESETS = {
    "rpn": (0.7, 0.3, 0.3, True, True),
    "rcnn": (0.5, 0.5, 0.5, False, True),
    "rcnn_low_quality": (0.5, 0.5, 0.5, True, True),
    "retinanet": (0.5, 0.4, 0.0, True, True),
    "neg_range_first_max": (0.5, (0.1, 0.4), 0.3, True, False),
}


@pytest.fixture(params=["compiled", "reference"])
def mode(request):
    if request.param == "compiled":
        assert codetr.ops.extension_info()["ops"][OP]["cpu"] == "compiled"
        codetr.ops.set_ops_mode("auto")
    else:
        codetr.ops.set_ops_mode("reference")
    yield request.param
    codetr.ops.set_ops_mode("auto")


@pytest.fixture
def compiled():
    assert codetr.ops.extension_info()["ops"][OP]["cpu"] == "compiled"
    codetr.ops.set_ops_mode("compiled")
    yield
    codetr.ops.set_ops_mode("auto")


def f32(x: float) -> float:
    """mmdetection compares float32 tensors with Python floats: in float32."""
    return float(torch.tensor(x, dtype=torch.float32))


def oracle_one_image(priors, gts, pos, neg, min_pos, low_quality, assign_all):
    """Brute force from the rules with Python lists; IoU from torchvision (mmdetection's
    arithmetic when unions exceed 1e-6)."""
    G, A = gts.shape[0], priors.shape[0]
    if G == 0 or A == 0:
        return torch.zeros(A, dtype=torch.long), torch.zeros(A)
    lo, hi = neg if isinstance(neg, tuple) else (0.0, neg)
    iou = torchvision.ops.box_iou(gts, priors).tolist()  # [G][A]
    assigned, max_ov = [-1] * A, [0.0] * A
    for a in range(A):
        col = [iou[g][a] for g in range(G)]
        m = max(col)
        max_ov[a] = m
        if f32(lo) <= m < f32(hi):
            assigned[a] = 0
        if m >= f32(pos):
            assigned[a] = col.index(m) + 1
    if low_quality:
        for g in range(G):
            gm = max(iou[g])
            if gm >= f32(min_pos):
                if assign_all:
                    for a in range(A):
                        if iou[g][a] == gm:
                            assigned[a] = g + 1
                else:
                    assigned[iou[g].index(gm)] = g + 1
    return torch.tensor(assigned), torch.tensor(max_ov, dtype=torch.float32)


def oracle(priors, gt_boxes, gt_counts, *args):
    res = [oracle_one_image(priors if priors.dim() == 2 else priors[b], gt_boxes[b, :n], *args)
           for b, n in enumerate(gt_counts.tolist())]
    return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


def assert_same(got, want):
    assert got[0].dtype == torch.long and got[0].shape == want[0].shape
    assert torch.equal(got[0], want[0]), (got[0] != want[0]).nonzero()[:10]
    torch.testing.assert_close(got[1], want[1].to(got[1].dtype), rtol=0, atol=0, equal_nan=True)


def small_case(seed, B=3, G=6, counts=(6, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    # 3 ratios on 3 levels: 756 priors, more than two kernel blocks of 256, not a multiple.
    priors, _ = grid_anchors(96, 128, strides=(8, 16, 32), scales=(4.0,), ratios=(0.5, 1.0, 2.0))
    gts = random_gts(g, B, G, 96, 128, min_side=4)
    return priors, gts, torch.tensor(counts)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seed", range(2))
def test_random_matches_oracle(mode, preset, seed):
    priors, gts, counts = small_case(seed)
    assert priors.shape[0] == 756
    args = PRESETS[preset]
    got = max_iou_assign(priors, gts, counts, *args)
    assert_same(got, oracle(priors, gts, counts, *args))
    assert (got[0] > 0).any() and (got[0] == 0).any()


def test_per_image_priors(mode):
    priors, gts, counts = small_case(11)
    g = torch.Generator().manual_seed(12)
    per_image = priors[None] + torch.rand(3, *priors.shape, generator=g) * 4
    for args in PRESETS.values():
        assert_same(max_iou_assign(per_image, gts, counts, *args),
                    oracle(per_image, gts, counts, *args))


def test_rpn_sized_compiled_equals_reference(compiled):
    """An 800x1333 image's 5 levels with 3 anchors per location (A = 66900), 40 and 17 gts."""
    g = torch.Generator().manual_seed(3)
    priors, _ = grid_anchors(800, 1333, ratios=(0.5, 1.0, 2.0))
    assert priors.shape[0] == 66900
    gts = random_gts(g, 2, 40, 800, 1333)
    counts = torch.tensor([40, 17])
    for args in (PRESETS["rpn"], PRESETS["neg_range_first_max"]):
        got = max_iou_assign(priors, gts, counts, *args)
        assert_same(got, max_iou_assign_reference(priors, gts, counts, *args))


def test_ties(mode):
    # Prior 7 and prior 580 (in another kernel block) are the same box, every gt's best;
    # gts 0 and 2 are the same box.
    priors, _, _ = small_case(0)
    priors = priors.clone()
    priors[580] = priors[7] = torch.tensor([20.0, 20.0, 40.0, 36.0])
    gts = torch.tensor([[[21.0, 20.0, 40.0, 37.0], [19.0, 22.0, 41.0, 35.0],
                         [21.0, 20.0, 40.0, 37.0]]])
    counts = torch.tensor([3])
    for args in PRESETS.values():
        got = max_iou_assign(priors, gts, counts, *args)
        assert_same(got, oracle(priors, gts, counts, *args))
    assigned = max_iou_assign(priors, gts, counts, *PRESETS["rpn"])[0][0]
    assert assigned[7] == assigned[580] == 3  # low-quality: the later duplicate overwrites
    assigned = max_iou_assign(priors, gts, counts, *PRESETS["neg_range_first_max"])[0][0]
    assert assigned[7] == 3 and assigned[580] == 1  # first prior only; 580 keeps its argmax


def test_gt_overlapping_nothing_with_min_pos_iou_zero(mode):
    # mmdetection's low-quality step with min_pos_iou = 0: a gt whose best IoU is 0 takes
    # every prior of IoU 0 with it (RetinaNet's config), even prior 0, a perfect match of
    # gt 0, since later gts overwrite.
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [0.0, 20.0, 10.0, 30.0]])
    gts = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]]])
    counts = torch.tensor([2])
    assigned, max_iou = max_iou_assign(priors, gts, counts, *PRESETS["retinanet"])
    assert assigned.tolist() == [[2, 2, 2]] and max_iou.tolist() == [[1.0, 0.0, 0.0]]
    assigned, _ = max_iou_assign(priors, gts, counts, *PRESETS["rpn"])
    assert assigned.tolist() == [[1, 0, 0]]


def test_batched_equals_per_image_and_padding_ignored(mode):
    priors, gts, _ = small_case(4, B=3, G=5)
    counts = torch.tensor([5, 3, 1])
    gts[1, 3:] = torch.tensor([0.0, 0.0, 128.0, 96.0])  # padding that would win if read
    gts[2, 1:] = priors[:4]
    for args in PRESETS.values():
        assigned, max_iou = max_iou_assign(priors, gts, counts, *args)
        for b in range(3):
            n = int(counts[b])
            a1, m1 = max_iou_assign(priors, gts[b:b + 1, :n].clone(), counts[b:b + 1], *args)
            assert torch.equal(assigned[b], a1[0]) and torch.equal(max_iou[b], m1[0])
            assert int(assigned[b].max()) <= n


def test_empty_inputs(mode):
    priors, _, _ = small_case(0)
    A = priors.shape[0]
    for gts, counts in ((torch.zeros(2, 0, 4), torch.zeros(2, dtype=torch.long)),
                        (torch.ones(2, 3, 4), torch.zeros(2, dtype=torch.long))):
        a, m = max_iou_assign(priors, gts, counts, 0.5, 0.4)
        assert a.shape == (2, A) and not a.any() and m.shape == (2, A) and not m.any()
    a, m = max_iou_assign(torch.zeros(0, 4), torch.ones(2, 3, 4), torch.tensor([3, 1]), 0.5, 0.4)
    assert a.shape == (2, 0) and m.shape == (2, 0) and m.dtype == torch.float32
    a, m = max_iou_assign(priors, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long), 0.5, 0.4)
    assert a.shape == (0, A) and m.shape == (0, A)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(mode, dtype):
    priors, gts, counts = small_case(5)
    args = PRESETS["rpn"]
    assigned, max_iou = max_iou_assign(priors.to(dtype), gts.to(dtype), counts, *args)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert max_iou.dtype == compute
    want = max_iou_assign_reference(priors.to(dtype).to(compute), gts.to(dtype).to(compute),
                                    counts, *args)
    assert_same((assigned, max_iou), want)
    if dtype != torch.float64:
        assert_same((assigned, max_iou),
                    oracle(priors.to(dtype).float(), gts.to(dtype).float(), counts, *args))


def test_autocast_keeps_float32(mode):
    priors, gts, counts = small_case(15)
    want = max_iou_assign(priors, gts, counts, *PRESETS["rpn"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = max_iou_assign(priors, gts, counts, *PRESETS["rpn"])
    assert got[1].dtype == torch.float32
    assert_same(got, want)


def test_non_contiguous(mode):
    priors, gts, counts = small_case(6)
    want = max_iou_assign(priors, gts, counts, *PRESETS["rpn"])
    strided = torch.stack([priors[:, i] for i in range(4)], 0).t()
    assert not strided.is_contiguous()
    got = max_iou_assign(strided, gts.transpose(0, 1).contiguous().transpose(0, 1), counts,
                         *PRESETS["rpn"])
    assert_same(got, want)


def test_nan_and_huge_coordinates(mode):
    priors, _, _ = small_case(0)
    gts = torch.tensor([[[10.0, 10.0, 30.0, 30.0], [float("nan"), 0.0, 10.0, 10.0],
                         [-1e30, -1e30, 1e30, 1e30], [20.0, 20.0, 60.0, 50.0]]])
    counts = torch.tensor([4])
    nan_prior = priors.clone()
    nan_prior[3, 0] = float("nan")
    for args in PRESETS.values():
        # A NaN gt: every prior's max is NaN (torch.max propagates it): no label from the
        # thresholds, but the other gts' low-quality matches still apply.
        got = max_iou_assign(priors, gts, counts, *args)
        assert_same(got, max_iou_assign_reference(priors, gts, counts, *args))
        assert got[1].isnan().all()
        assert ((got[0] > 0).any() and not (got[0] == 2).any()) == args[3]
        # A NaN prior: it stays ignored and makes every gt's maximum NaN.
        got = max_iou_assign(nan_prior, gts[:, 2:], counts - 2, *args)
        assert_same(got, max_iou_assign_reference(nan_prior, gts[:, 2:], counts - 2, *args))
        assert got[0][0, 3] == -1 and got[1][0, 3].isnan()
        assert (got[0] >= 0).any()


def test_thread_count_does_not_change_result(compiled):
    priors, _ = grid_anchors(256, 320, ratios=(0.5, 1.0, 2.0))
    gts = random_gts(torch.Generator().manual_seed(8), 2, 30, 256, 320)
    counts = torch.tensor([30, 21])
    threads = torch.get_num_threads()
    for args in PRESETS.values():
        try:
            torch.set_num_threads(1)
            one = max_iou_assign(priors, gts, counts, *args)
        finally:
            torch.set_num_threads(threads)
        assert_same(max_iou_assign(priors, gts, counts, *args), one)


def test_opcheck(compiled):
    priors, gts, counts = small_case(9)
    op = torch.ops.codetr.max_iou_assign.default
    torch.library.opcheck(op, (priors, gts, counts, 0.7, 0.0, 0.3, 0.3, True, True))
    torch.library.opcheck(op, (priors[None].expand(3, -1, -1).double(), gts.half(), counts, 0.5,
                               0.1, 0.4, 0.0, True, False))


def test_torch_compile_fullgraph(compiled):
    priors, gts, counts = small_case(10)

    def fn(p, g, c):
        assigned, max_iou = max_iou_assign(p, g, c, 0.5, (0.1, 0.4), 0.3, True, False)
        return assigned, max_iou + 1

    got = torch.compile(fn, fullgraph=True)(priors, gts, counts)
    want = fn(priors, gts, counts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


def test_bad_neg_iou_thr(mode):
    with pytest.raises(ValueError, match="neg_iou_thr"):
        max_iou_assign(torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([1, 2]), 0.5,
                       (0.1, 0.2, 0.3))


@st.composite
def max_iou_inputs(draw):
    A, B, G = draw(st.integers(0, 10)), draw(st.integers(0, 2)), draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    priors = boxes(draw, A, special, dtype)
    if draw(st.booleans()):
        priors = torch.stack([boxes(draw, A, special, dtype) for _ in range(B)]) if B else priors
    gts = boxes(draw, B * G, special, dtype).view(B, G, 4)
    counts = tensors(draw, (B,), st.integers(0, G), torch.long)
    thresholds = draw(st.sampled_from([(0.7, 0.3, 0.3, True), (0.5, 0.5, 0.5, False),
                                       (0.5, (0.1, 0.4), 0.0, True)]))
    return priors, gts, counts, thresholds, draw(st.booleans())


@PROPERTY_SETTINGS
@given(max_iou_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    priors, gts, counts, (pos, neg, min_pos, low_quality), max_all = inputs
    assert_paths_agree(max_iou_assign, (priors, gts, counts, pos, neg, min_pos, low_quality, max_all))
