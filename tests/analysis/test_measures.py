"""The analysis measures on hand-made inputs with answers worked out by hand."""
import pytest
import torch

from codetr.analysis import (foreground_mask, instability, iof_iob, level_norms, mean_instability,
                             minmax_normalise, score_maps)
from codetr.analysis.reports import curve_area, default_labels

# ---------------------------------------------------------------- instability


def test_instability_counts_queries_whose_match_changed():
    assert instability([0, -1, 1, -1], [0, -1, 1, -1]) == 0
    # q0 loses its gt, q1 gains one, q2 swaps gt 1 -> 0: three changes; q3 stays unmatched
    assert instability([0, -1, 1, -1], [-1, 2, 0, -1]) == 3
    # two queries exchanging their gts count twice
    assert instability([1, 0], [0, 1]) == 2


def test_mean_instability_averages_over_images():
    prev = [[0, -1, -1], [-1, 0, 1]]
    cur = [[-1, 0, -1], [-1, 0, 1]]  # image 0: q0 and q1 changed; image 1: none
    assert mean_instability(prev, cur) == 1.0
    # a 3-epoch sequence on one image: gt 0 moves from q0 to q2 (2 changes), then stays
    seq = [[[0, -1, -1]], [[-1, -1, 0]], [[-1, -1, 0]]]
    assert [mean_instability(a, b) for a, b in zip(seq, seq[1:])] == [2.0, 0.0]


def test_instability_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="lengths"):
        instability([0, 1], [0])
    with pytest.raises(ValueError, match="number of images"):
        mean_instability([[0]], [[0], [1]])


# ---------------------------------------------------------------- IoF / IoB

T = torch.linspace(0, 1, 101)


def test_score_equal_to_the_foreground_separates_perfectly():
    fg = torch.zeros(8, 10, dtype=torch.bool)
    fg[2:5, 3:9] = True
    iof, iob = iof_iob(fg.float(), fg, T)
    inner = (T > 0) & (T < 1)
    assert torch.all(iof[inner] == 1) and torch.all(iob[inner] == 0)
    assert iof[0] == 1 and iob[0] == 0  # score 0 is not above t = 0
    assert iof[-1] == 0 and iob[-1] == 0  # nothing exceeds 1


def test_constant_score_does_not_discriminate():
    fg = torch.zeros(6, 6, dtype=torch.bool)
    fg[:2] = True
    iof, iob = iof_iob(torch.full((6, 6), 0.3), fg, T)
    expected = (T < 0.3).float()
    torch.testing.assert_close(iof, expected)
    torch.testing.assert_close(iob, expected)


def test_ramp_has_the_analytic_curve():
    # W columns, score (j + 0.5) / W, foreground = left half. For t = k / W:
    # foreground cells above t: W/2 - k for t <= 1/2 (else 0) -> IoF = 1 - 2t;
    # background cells above t: W/2 for t <= 1/2, else W - k  -> IoB = min(1, 2 - 2t).
    W = 100
    score = ((torch.arange(W) + 0.5) / W).expand(3, W)
    fg = torch.zeros(3, W, dtype=torch.bool)
    fg[:, :W // 2] = True
    iof, iob = iof_iob(score, fg, T)
    torch.testing.assert_close(iof, (1 - 2 * T).clamp(min=0), atol=1e-6, rtol=0)
    torch.testing.assert_close(iob, (2 - 2 * T).clamp(max=1), atol=1e-6, rtol=0)
    # every foreground cell scores below every background cell: the area is 0
    assert curve_area(iof, iob) == pytest.approx(0.0)
    iof, iob = iof_iob(score, ~fg, T)  # and 1 with the roles swapped
    assert curve_area(iof, iob) == pytest.approx(1.0)


def test_cells_are_pooled_over_images():
    # image A: 1 fg cell (score 1), 3 bg (score 0); image B: 3 fg (score 0), 1 bg (score 1)
    a = torch.tensor([[1.0, 0, 0, 0]])
    b = torch.tensor([[0.0, 0, 0, 1]])
    fa = torch.tensor([[True, False, False, False]])
    fb = torch.tensor([[True, True, True, False]])
    iof, iob = iof_iob([a, b], [fa, fb], torch.tensor([0.5]))
    assert iof.item() == pytest.approx(1 / 4) and iob.item() == pytest.approx(1 / 4)
    iof, iob = iof_iob(a, torch.zeros_like(fa), torch.tensor([0.5]))
    assert torch.isnan(iof).all() and iob.item() == pytest.approx(1 / 4)


def test_curve_area_of_a_blind_score_is_one_half():
    t = torch.linspace(0, 1, 11)
    assert curve_area(1 - t, 1 - t) == pytest.approx(0.5)


def test_foreground_mask_uses_cell_centres():
    # cells of stride (4, 2): centre of cell (i, j) = (4i + 2, 2j + 1)
    boxes = torch.tensor([[0.0, 0.0, 3.5, 5.0],  # x in [0, 3.5): j = 0, 1; y in [0, 5): i = 0
                          [5.0, 6.0, 7.0, 14.0]])  # x: j = 2 (centre 5; 7 excluded); y: i = 1, 2
    m = foreground_mask(boxes, (4, 5), (4.0, 2.0))
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0, 0:2] = True
    expected[1:3, 2] = True
    assert torch.equal(m, expected)
    assert not foreground_mask(torch.zeros(0, 4), (2, 2), (1.0, 1.0)).any()


# ---------------------------------------------------------------- score maps


def _memory(levels):
    """levels: list of [H, W, C] tensors -> memory [1, S, C], spatial_shapes [L, 2]."""
    memory = torch.cat([lv.reshape(-1, lv.shape[-1]) for lv in levels])[None]
    shapes = torch.tensor([lv.shape[:2] for lv in levels])
    return memory, shapes


def test_level_norms_and_per_level_normalisation():
    # level 0 (2 x 2): vectors with norms 5, 0, 10, 2.5; level 1 (1 x 2): norms 1, 3
    l0 = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[6.0, 8.0], [1.5, 2.0]]])
    l1 = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    memory, shapes = _memory([l0, l1])
    n0, n1 = level_norms(memory, shapes)
    torch.testing.assert_close(n0[0], torch.tensor([[5.0, 0.0], [10.0, 2.5]]))
    torch.testing.assert_close(n1[0], torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(minmax_normalise(n0[0]), torch.tensor([[0.5, 0.0], [1.0, 0.25]]))
    assert torch.equal(minmax_normalise(torch.full((2, 2), 7.0)), torch.zeros(2, 2))


def test_score_map_ignores_padding_and_averages_resized_levels():
    C = 2
    # level 0: 3 x 4 padded, valid 2 x 4 (last row is padding, with a huge norm that must
    # not enter the min-max); norms along a row 0, 1, 2, 3 -> normalised 0, 1/3, 2/3, 1.
    l0 = torch.zeros(3, 4, C)
    l0[:2, :, 0] = torch.arange(4.0)
    l0[2] = 1000.0
    # level 1: 2 x 3 padded, valid 1 x 2: norms 0 (left) and 4 (right) -> 0, 1; bilinear
    # (align_corners=False) 1 x 2 -> 2 x 4 samples x = -0.25, 0.25, 0.75, 1.25 -> 0, .25, .75, 1
    l1 = torch.zeros(2, 3, C)
    l1[0, 1, 1] = 4.0
    l1[1, :] = 1000.0
    l1[0, 2] = 1000.0
    memory, shapes = _memory([l0, l1])
    pad0 = torch.zeros(3, 4, dtype=torch.bool)
    pad0[2] = True
    pad1 = torch.ones(2, 3, dtype=torch.bool)
    pad1[0, :2] = False
    padding = torch.cat((pad0.flatten(), pad1.flatten()))[None]
    (score,) = score_maps(memory, padding, shapes)
    row = (torch.tensor([0, 1 / 3, 2 / 3, 1]) + torch.tensor([0, 0.25, 0.75, 1])) / 2
    torch.testing.assert_close(score, row.expand(2, 4))


def test_default_labels_are_short_and_distinct(tmp_path):
    assert default_labels([tmp_path / "k0", tmp_path / "k2"]) == ["k0", "k2"]
    assert default_labels([tmp_path / "k0" / "last.pt", tmp_path / "k2" / "last.pt"], checkpoints=True) == \
        ["k0", "k2"]
    assert default_labels([tmp_path / "k0" / "a.pt", tmp_path / "k0" / "b.pt"], checkpoints=True) == \
        ["k0/a.pt", "k0/b.pt"]
