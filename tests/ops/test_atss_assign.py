"""atss_assign: compiled kernel and reference against a brute-force oracle written from
mmdetection's ATSSAssigner rules, plus the op contract (batching, padding, empties, dtypes,
opcheck, torch.compile, argument errors)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import torchvision

import codetr
import malformed_cases
from properties import PROPERTY_SETTINGS, assert_paths_agree, boxes, tensors, values
from codetr.ops import atss_assign, atss_assign_reference
from assign_cases import grid_anchors, random_gts

OP = "atss_assign"
NEG = -100000000.0  # mmdetection's -INF for negatives


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


def oracle_one_image(anchors, levels, gts, topk, ties_to_higher_index=False):
    """Brute force from the rules, one gt and one anchor at a time. IoU from torchvision
    (the same float32 arithmetic as mmdetection's bbox_overlaps when unions exceed 1e-6),
    candidate order by (distance, index), statistics with Python's exact fmean/stdev."""
    A, G = anchors.shape[0], gts.shape[0]
    if G == 0 or A == 0:
        return torch.zeros(A, dtype=torch.long), torch.zeros(A)
    iou = torchvision.ops.box_iou(anchors, gts)
    acx = (anchors[:, 0] + anchors[:, 2]) / 2
    acy = (anchors[:, 1] + anchors[:, 3]) / 2
    gcx = (gts[:, 0] + gts[:, 2]) / 2
    gcy = (gts[:, 1] + gts[:, 3]) / 2
    dist = ((acx[:, None] - gcx[None]) ** 2 + (acy[:, None] - gcy[None]) ** 2).sqrt()
    inside = torch.stack([acx[:, None] - gts[None, :, 0], acy[:, None] - gts[None, :, 1],
                          gts[None, :, 2] - acx[:, None], gts[None, :, 3] - acy[:, None]]
                         ).amin(0) > 0.01  # [A, G]
    dist, iou, inside = dist.tolist(), iou.tolist(), inside.tolist()
    assigned, best = [0] * A, [NEG] * A
    for g in range(G):
        cands, start = [], 0
        for n in levels:
            order = sorted(range(start, start + n),
                           key=lambda a: (dist[a][g], -a if ties_to_higher_index else a))
            cands += order[:min(topk, n)]
            start += n
        vals = [iou[a][g] for a in cands]
        thr = statistics.fmean(vals) + (statistics.stdev(vals) if len(vals) > 1 else math.nan)
        for a in cands:
            if iou[a][g] >= thr and inside[a][g] and iou[a][g] > best[a]:
                best[a], assigned[a] = iou[a][g], g + 1
    return torch.tensor(assigned), torch.tensor(best, dtype=torch.float32)


def oracle(anchors, levels, gt_boxes, gt_counts, topk=9, ties_to_higher_index=False):
    res = [oracle_one_image(anchors, levels, gt_boxes[b, :n], topk, ties_to_higher_index)
           for b, n in enumerate(gt_counts.tolist())]
    return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])


def assert_same(got, want):
    assert got[0].dtype == torch.long and got[0].shape == want[0].shape
    assert torch.equal(got[0], want[0]), (got[0] != want[0]).nonzero()[:10]
    torch.testing.assert_close(got[1], want[1].to(got[1].dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_matches_oracle(mode, seed):
    g = torch.Generator().manual_seed(seed)
    anchors, levels = grid_anchors(96, 128, strides=(8, 16, 32, 64))
    gts = random_gts(g, 3, 6, 96, 128)
    counts = torch.tensor([6, 3, 0])
    got = atss_assign(anchors, levels, gts, counts)
    assert_same(got, oracle(anchors, levels, gts, counts))
    assert (got[0] > 0).any()  # the case exercises positives


def test_t1_sized_compiled_equals_reference(compiled):
    """An 800x1333 image's 5 levels (A = 22300) with 30 and 12 gts."""
    g = torch.Generator().manual_seed(7)
    anchors, levels = grid_anchors(800, 1333)
    assert anchors.shape[0] == 22300
    gts = random_gts(g, 2, 30, 800, 1333)
    counts = torch.tensor([30, 12])
    got = atss_assign(anchors, levels, gts, counts)
    assert_same(got, atss_assign_reference(anchors, levels, gts, counts))
    assert int((got[0] > 0).sum()) > 100


def test_batched_equals_per_image_and_padding_ignored(mode):
    g = torch.Generator().manual_seed(1)
    anchors, levels = grid_anchors(128, 128, strides=(8, 16, 32))
    gts = random_gts(g, 3, 8, 128, 128)
    counts = torch.tensor([8, 5, 2])
    # Padding rows that would win everything if they were read: the whole image.
    gts[1, 5:] = torch.tensor([0.0, 0.0, 128.0, 128.0])
    gts[2, 2:] = gts[0, :6]
    assigned, max_iou = atss_assign(anchors, levels, gts, counts)
    for b in range(3):
        n = int(counts[b])
        a1, m1 = atss_assign(anchors, levels, gts[b:b + 1, :n].clone(), counts[b:b + 1])
        assert torch.equal(assigned[b], a1[0]) and torch.equal(max_iou[b], m1[0])
        assert int(assigned[b].max()) <= n


@pytest.mark.parametrize("topk", [2, 4, 5, 7])
def test_distance_ties_go_to_lower_index(mode, topk):
    # Three anchors (ratios 0.5, 1, 2) share each centre: exact distance ties, with different
    # IoUs, at the k-th place whenever topk is not a multiple of 3.
    anchors, levels = grid_anchors(64, 64, strides=(8, 16), scales=(4.0,), ratios=(0.5, 1.0, 2.0))
    gts = torch.tensor([[[9.0, 11.0, 17.0, 23.0], [5.0, 9.0, 21.0, 25.0], [3.0, -3.0, 23.0, 37.0],
                         [12.0, 8.0, 28.0, 24.0], [-2.0, 10.0, 28.0, 24.0]]])
    counts = torch.tensor([5])
    got = atss_assign(anchors, levels, gts, counts, topk)
    assert_same(got, oracle(anchors, levels, gts, counts, topk))
    # The ties matter: breaking them the other way changes the result.
    other = oracle(anchors, levels, gts, counts, topk, ties_to_higher_index=True)
    assert not torch.equal(got[0], other[0])


@pytest.mark.parametrize("topk", [1, 9, 40])
def test_scattered_anchors_with_duplicates(mode, topk):
    # Anchors in no grid order, many sharing a centre (exact distance ties), levels of
    # different sizes including an empty one.
    g = torch.Generator().manual_seed(topk)
    boxes = random_gts(g, 1, 60, 100, 100, min_side=4)[0]
    anchors = torch.cat([boxes, boxes[:20].flip(0), boxes[10:30] + 0.0])  # 100 anchors
    anchors[::7] = anchors[3]
    levels = [50, 30, 0, 20]
    gts = random_gts(g, 2, 5, 100, 100, min_side=8)
    counts = torch.tensor([5, 4])
    got = atss_assign(anchors, levels, gts, counts, topk)
    assert_same(got, oracle(anchors, [n for n in levels if n], gts, counts, topk))


@pytest.mark.parametrize("scale", [3e-3, 1e18])
def test_extreme_scales(compiled, scale):
    # Boxes a few hundredths of a pixel wide (the 0.01 inside margin almost rules them out),
    # and coordinates whose squared distances and areas approach the float32 maximum.
    g = torch.Generator().manual_seed(2)
    anchors, levels = grid_anchors(64, 64, strides=(8, 16), scales=(4.0,))
    gts = random_gts(g, 2, 4, 64, 64)
    counts = torch.tensor([4, 3])
    got = atss_assign(anchors * scale, levels, gts * scale, counts)
    assert_same(got, atss_assign_reference(anchors * scale, levels, gts * scale, counts))
    assert (got[0] > 0).any()


def test_identical_gts_first_wins(mode):
    anchors, levels = grid_anchors(64, 64, strides=(8, 16), scales=(4.0,))
    box = torch.tensor([10.0, 14.0, 40.0, 44.0])
    gts = torch.stack([box, box, box + torch.tensor([14.0, 10.0, 14.0, 10.0])])[None]
    assigned, max_iou = atss_assign(anchors, levels, gts, torch.tensor([3]))
    assert (assigned == 1).any() and not (assigned == 2).any()
    assert_same((assigned, max_iou), oracle(anchors, levels, gts, torch.tensor([3])))


def test_tiny_and_whole_image_gts(mode):
    anchors, levels = grid_anchors(128, 128, strides=(8, 16, 32, 64))
    gts = torch.tensor([[[50.0, 50.0, 51.5, 52.0],    # smaller than any anchor
                         [0.0, 0.0, 128.0, 128.0],    # the whole image
                         [-20.0, -20.0, 150.0, 150.0],  # beyond it
                         [64.3, 0.0, 64.4, 128.0]]])  # a thin sliver
    counts = torch.tensor([4])
    got = atss_assign(anchors, levels, gts, counts)
    assert_same(got, oracle(anchors, levels, gts, counts))
    assert (got[0] == 2).any() or (got[0] == 3).any()


def test_topk_beyond_level_and_empty_level(mode):
    anchors, levels = grid_anchors(32, 32, strides=(8, 16, 32))  # 16, 4, 1 anchors
    assert levels == [16, 4, 1]
    g = torch.Generator().manual_seed(3)
    gts = random_gts(g, 2, 3, 32, 32, min_side=6, max_frac=0.8)
    counts = torch.tensor([3, 2])
    for lv, a in ((levels, anchors),
                  ([16, 0, 4, 0, 1], anchors)):  # levels without anchors
        for topk in (1, 3, 9, 50):
            got = atss_assign(a, lv, gts, counts, topk)
            assert_same(got, oracle(a, [n for n in lv if n], gts, counts, topk))


def test_single_candidate_has_no_positive(mode):
    # One anchor: torch.std of one sample is NaN, so the threshold is NaN (mmdetection).
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    gts = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
    assigned, max_iou = atss_assign(anchors, [1], gts, torch.tensor([1]))
    assert assigned.tolist() == [[0]] and max_iou.tolist() == [[NEG]]


def test_equal_candidate_ious(mode):
    # One level of 9 identical-size anchors around a gt they all contain: the 9 IoUs are
    # equal, the std 0, and the threshold the common IoU: positive where the centre is in.
    ys, xs = torch.meshgrid(torch.arange(3) * 4.0, torch.arange(3) * 4.0, indexing="ij")
    c = torch.stack([xs.flatten(), ys.flatten()], -1) + 40
    anchors = torch.cat([c - 32, c + 32], -1)
    gts = torch.tensor([[[43.0, 43.0, 45.0, 45.0]]])  # contains the centre (44, 44) only
    assigned, max_iou = atss_assign(anchors, [9], gts, torch.tensor([1]))
    want = torch.zeros(1, 9, dtype=torch.long)
    want[0, 4] = 1
    assert torch.equal(assigned, want)
    assert max_iou[0, 4] == torchvision.ops.box_iou(anchors[4:5], gts[0])[0, 0]


def test_empty_inputs(mode):
    anchors, levels = grid_anchors(32, 32, strides=(8, 16))
    # no gts at all
    a, m = atss_assign(anchors, levels, torch.zeros(2, 0, 4), torch.zeros(2, dtype=torch.long))
    assert a.shape == (2, 20) and not a.any() and m.shape == (2, 20) and not m.any()
    # gts that are all padding
    a, m = atss_assign(anchors, levels, torch.ones(2, 3, 4), torch.zeros(2, dtype=torch.long))
    assert not a.any() and not m.any()
    # no anchors
    a, m = atss_assign(torch.zeros(0, 4), [0, 0], torch.ones(2, 3, 4), torch.tensor([3, 1]))
    assert a.shape == (2, 0) and m.shape == (2, 0) and m.dtype == torch.float32
    # no images
    a, m = atss_assign(anchors, levels, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long))
    assert a.shape == (0, 20) and m.shape == (0, 20)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(mode, dtype):
    g = torch.Generator().manual_seed(5)
    anchors, levels = grid_anchors(64, 96, strides=(8, 16, 32))
    gts = random_gts(g, 2, 5, 64, 96)
    counts = torch.tensor([5, 4])
    assigned, max_iou = atss_assign(anchors.to(dtype), levels, gts.to(dtype), counts)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert max_iou.dtype == compute
    # Reduced-precision boxes are computed in float32 from their rounded values.
    want = atss_assign_reference(anchors.to(dtype).to(compute), levels,
                                 gts.to(dtype).to(compute), counts)
    assert_same((assigned, max_iou), want)
    if dtype != torch.float64:
        assert_same((assigned, max_iou), oracle(anchors.to(dtype).float(), levels,
                                                gts.to(dtype).float(), counts))


def test_autocast_keeps_float32(mode):
    g = torch.Generator().manual_seed(15)
    anchors, levels = grid_anchors(64, 96, strides=(8, 16, 32))
    gts = random_gts(g, 2, 5, 64, 96)
    counts = torch.tensor([5, 1])
    want = atss_assign(anchors, levels, gts, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = atss_assign(anchors, levels, gts, counts)
    assert got[1].dtype == torch.float32
    assert_same(got, want)


def test_mixed_dtypes_and_non_contiguous(mode):
    g = torch.Generator().manual_seed(6)
    anchors, levels = grid_anchors(64, 64, strides=(8, 16))
    gts = random_gts(g, 2, 4, 64, 64)
    counts = torch.tensor([4, 2])
    want = atss_assign(anchors, levels, gts, counts)
    strided = torch.stack([anchors[:, i] for i in range(4)], 0).t()
    assert not strided.is_contiguous()
    got = atss_assign(strided, levels, gts.transpose(0, 1).contiguous().transpose(0, 1), counts)
    assert_same(got, want)
    got = atss_assign(anchors.half(), levels, gts, counts)
    assert got[1].dtype == torch.float32


def test_nan_and_huge_coordinates(mode):
    anchors, levels = grid_anchors(64, 64, strides=(8, 16), scales=(2.0,))
    gts = torch.tensor([[[10.0, 10.0, 30.0, 30.0], [float("nan"), 0.0, 10.0, 10.0],
                         [-1e30, -1e30, 1e30, 1e30], [20.0, 20.0, 60.0, 50.0]]])
    counts = torch.tensor([4])
    got = atss_assign(anchors, levels, gts, counts)
    want = atss_assign_reference(anchors, levels, gts, counts)
    assert_same(got, want)
    assert not (got[0] == 2).any()  # a NaN gt takes nothing
    assert (got[0] == 1).any() and (got[0] == 4).any()
    # The huge gt's area overflows to inf: its IoUs are all 0, so is its threshold, and its
    # candidates (centres inside) are positives of IoU 0 where no other gt claims them.
    assert ((got[0] == 3) & (got[1] == 0)).any()


def test_thread_count_does_not_change_result(compiled):
    g = torch.Generator().manual_seed(8)
    anchors, levels = grid_anchors(256, 320)
    gts = random_gts(g, 2, 40, 256, 320)
    counts = torch.tensor([40, 33])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = atss_assign(anchors, levels, gts, counts)
    finally:
        torch.set_num_threads(threads)
    assert_same(atss_assign(anchors, levels, gts, counts), one)


def test_opcheck(compiled):
    g = torch.Generator().manual_seed(9)
    anchors, levels = grid_anchors(48, 64, strides=(8, 16, 32))
    gts = random_gts(g, 2, 4, 48, 64)
    counts = torch.tensor([4, 2])
    torch.library.opcheck(torch.ops.codetr.atss_assign.default, (anchors, levels, gts, counts, 9))
    torch.library.opcheck(torch.ops.codetr.atss_assign.default,
                          (anchors.double(), levels, gts.half(), counts, 3))


def test_torch_compile_fullgraph(compiled):
    g = torch.Generator().manual_seed(10)
    anchors, levels = grid_anchors(48, 64, strides=(8, 16, 32))
    gts = random_gts(g, 2, 4, 48, 64)
    counts = torch.tensor([4, 3])

    def fn(a, gt, c):
        assigned, max_iou = atss_assign(a, levels, gt, c, topk=5)
        return assigned, max_iou * 2

    got = torch.compile(fn, fullgraph=True)(anchors, gts, counts)
    want = fn(anchors, gts, counts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("case", malformed_cases.CASES[OP], ids=str)
def test_malformed_and_edge_inputs(case, assert_compiled):
    """Every path (compiled, reference, fake kernel) raises the same named error, or gives
    the same values, each case in its own process (tests/ops/malformed_cases.py)."""
    assert_compiled(OP)
    malformed_cases.check_case(OP, case)


@st.composite
def atss_inputs(draw):
    levels = [draw(st.integers(0, 6)) for _ in range(draw(st.integers(1, 3)))]
    B, G = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    special = draw(st.booleans())
    anchors = boxes(draw, sum(levels), special, dtype)
    gts = boxes(draw, B * G, special, dtype).view(B, G, 4)
    counts = tensors(draw, (B,), st.integers(0, G), torch.long)
    return anchors, levels, gts, counts, draw(st.integers(1, 4))


@PROPERTY_SETTINGS
@given(atss_inputs())
def test_compiled_matches_reference_on_random_inputs(inputs):
    anchors, levels, gts, counts, topk = inputs
    assert_paths_agree(atss_assign, (anchors, levels, gts, counts), {"topk": topk})
