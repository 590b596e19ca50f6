"""FCOS auxiliary head: assignment, customized positives, losses, gradients, predict.

The truth is a brute-force loop over (level, cell, gt) written here with plain floats, and
torchvision's focal / GIoU losses for the loss values."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from codetr.config import build_aux_head
from codetr.models.heads.fcos import FCOSHead, default_regress_ranges

STRIDES = (8, 16, 32, 64, 128)
RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))
C_IN, NUM_CLASSES = 8, 3
PAD_H, PAD_W = 96, 160  # padded batch


def make_feats(B, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C_IN, math.ceil(PAD_H / s), math.ceil(PAD_W / s), generator=g) for s in STRIDES]
    return [f.requires_grad_(requires_grad) for f in feats]


def hand_targets():
    """Image 0 (96 x 160, no padding):
      A [10,10,50,40] lies inside B [0,0,90,60]: cell (36, 28) of level 0 is in both centre
        regions and in range for both -> A (smaller area); (12, 12) is inside A but outside
        its centre region (30 +- 12, 25 +- 12) -> background.
      D [4,20,156,76]: the level-0 cells around its centre have max distance > 64 (out of
        range), so D is learnt on level 1.
    Image 1 (64 x 96, padded to 96 x 160): E [40,30,96,64] touches the image's bottom-right
      corner; F [0,0,160,96] covers the whole padded map, so only the padding rule keeps
      the cells of the padding negative."""
    t0 = {"boxes": torch.tensor([[10., 10., 50., 40.], [0., 0., 90., 60.], [4., 20., 156., 76.]]),
          "labels": torch.tensor([0, 1, 2])}
    t1 = {"boxes": torch.tensor([[40., 30., 96., 64.], [0., 0., 160., 96.]]), "labels": torch.tensor([2, 1])}
    sizes = torch.tensor([[96, 160], [64, 96]])
    return [t0, t1], sizes


def brute_force(feats, targets, sizes, radius=1.5):
    """-> per image a list of (level, y, x, gt index) for every positive cell, in level then
    row-major order."""
    out = []
    for b, t in enumerate(targets):
        h, w = sizes[b].tolist()
        pos = []
        for j, s in enumerate(STRIDES):
            lo, hi = RANGES[j]
            H, W = feats[j].shape[-2:]
            for yi in range(H):
                for xi in range(W):
                    px, py = (xi + 0.5) * s, (yi + 0.5) * s
                    if not (px < w and py < h):
                        continue
                    best, best_area = -1, math.inf
                    for g, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
                        inside = x1 < px < x2 and y1 < py < y2
                        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                        in_centre = abs(px - cx) < radius * s and abs(py - cy) < radius * s
                        m = max(px - x1, py - y1, x2 - px, y2 - py)
                        area = (x2 - x1) * (y2 - y1)
                        if inside and in_centre and lo <= m <= hi and area < best_area:
                            best, best_area = g, area
                    if best >= 0:
                        pos.append((j, yi, xi, best))
        out.append(pos)
    return out


def new_head(**kw):
    torch.manual_seed(0)
    return FCOSHead(NUM_CLASSES, in_channels=C_IN, strides=STRIDES, **kw)


def test_default_ranges_and_registry():
    assert default_regress_ranges(5) == tuple((float(a), float(b)) for a, b in RANGES)
    assert default_regress_ranges(3) == ((-1.0, 64.0), (64.0, 128.0), (128.0, math.inf))
    head = build_aux_head("fcos", NUM_CLASSES, in_channels=C_IN)
    assert isinstance(head, FCOSHead) and head.regress_ranges == default_regress_ranges(5)
    assert head.cls_convs[1].num_groups == 8  # GroupNorm: the most groups <= 32 dividing 8


def test_assignment_and_positives_match_brute_force():
    head = new_head()
    feats = make_feats(2, requires_grad=True)
    targets, sizes = hand_targets()
    _, P = head(feats, targets, sizes)
    truth = brute_force(feats, targets, sizes)

    # The hand-built cases the brute force must (and does) contain.
    pos0 = {(j, y, x): g for j, y, x, g in truth[0]}
    assert pos0[(0, 3, 4)] == 0  # (36, 28): inside A and B -> A, the smaller
    assert (0, 1, 1) not in pos0  # (12, 12): inside A, outside its centre region
    assert (0, 5, 9) not in pos0 and (0, 6, 10) not in pos0  # D's centre cells on level 0: out of range
    assert pos0[(1, 2, 4)] == 2 and pos0[(1, 3, 5)] == 2  # D on level 1
    assert {g for *_, g in truth[1]} == {0, 1}  # E on level 0, F (out of level 0's range) above

    for b, t in enumerate(targets):
        rows = truth[b]
        assert len(rows) > 0
        lv = torch.tensor([r[0] for r in rows])
        st = torch.tensor([float(STRIDES[r[0]]) for r in rows])
        cx = torch.tensor([r[2] + 0.5 for r in rows]) * st
        cy = torch.tensor([r[1] + 0.5 for r in rows]) * st
        half = torch.tensor([8 * 2 ** (2 + j) / 2 for j in lv.tolist()])
        assert half[lv == 0].eq(16).all()  # level 0 -> side 32
        expect_boxes = torch.stack((cx - half, cy - half, cx + half, cy + half), -1)
        gidx = torch.tensor([r[3] for r in rows])
        expect_feats = torch.stack([feats[j][b, :, y, x] for j, y, x, _ in rows])
        torch.testing.assert_close(P.pos_boxes[b], expect_boxes)
        assert P.pos_labels[b].tolist() == t["labels"][gidx].tolist()
        torch.testing.assert_close(P.pos_gt_boxes[b], t["boxes"][gidx])
        torch.testing.assert_close(P.pos_feats[b], expect_feats)
        assert not P.pos_boxes[b].requires_grad and P.pos_feats[b].requires_grad

        # Negatives: up to 300 valid background cells, with the same squares and features.
        h, w = sizes[b].tolist()
        n_bg = sum(1 for j, s in enumerate(STRIDES) for yi in range(feats[j].shape[-2])
                   for xi in range(feats[j].shape[-1]) if (xi + 0.5) * s < w and (yi + 0.5) * s < h) - len(rows)
        assert P.neg_boxes[b].shape[0] == min(300, n_bg) == P.neg_feats[b].shape[0]
        positives = {(j, y, x) for j, y, x, _ in rows}
        for box, f in zip(P.neg_boxes[b], P.neg_feats[b]):
            side = float(box[2] - box[0])
            j = int(round(math.log2(side / 8))) - 2
            s = STRIDES[j]
            x, y = int((box[0] + box[2]) / 2 / s - 0.5), int((box[1] + box[3]) / 2 / s - 0.5)
            assert (j, y, x) not in positives and (x + 0.5) * s < w and (y + 0.5) * s < h
            torch.testing.assert_close(f, feats[j][b, :, y, x])


def test_padding_never_positive():
    """F covers the whole padded map: without the padding rule the padding's cells near
    its centre would be positive."""
    head = new_head()
    feats = make_feats(1)
    targets = [{"boxes": torch.tensor([[0., 0., 160., 96.]]), "labels": torch.tensor([1])}]
    sizes = torch.tensor([[40, 72]])  # F's centre (80, 48) lies in the padding
    _, P = head(feats, targets, sizes)
    for boxes in (P.pos_boxes[0], P.neg_boxes[0]):
        c = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert (c[:, 0] < 72).all() and (c[:, 1] < 40).all()
    # and in the unpadded 96 x 160 image those cells are positive
    _, P = head(feats, targets, torch.tensor([[96, 160]]))
    c = (P.pos_boxes[0][:, :2] + P.pos_boxes[0][:, 2:]) / 2
    assert ((c[:, 0] >= 72) | (c[:, 1] >= 40)).any()


def test_losses_match_independent_computation():
    head = new_head()
    with torch.no_grad():  # spread the outputs so the losses are not all at their init values
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    feats = make_feats(2)
    targets, sizes = hand_targets()
    losses, _ = head(feats, targets, sizes)
    cls_out, reg_out, ctr_out = head.forward_levels(feats)
    truth = brute_force(feats, targets, sizes)

    offsets = [0]
    for f in feats:
        offsets.append(offsets[-1] + f.shape[-2] * f.shape[-1])
    num_pos = sum(len(r) for r in truth)
    focal, giou_w, ctr_w, ctr_bce = 0.0, 0.0, 0.0, 0.0
    for b, t in enumerate(targets):
        h, w = sizes[b].tolist()
        assign = {(j, y, x): g for j, y, x, g in truth[b]}
        for j, s in enumerate(STRIDES):
            H, W = feats[j].shape[-2:]
            for yi in range(H):
                for xi in range(W):
                    px, py = (xi + 0.5) * s, (yi + 0.5) * s
                    if not (px < w and py < h):
                        continue
                    n = yi * W + xi
                    target = torch.zeros(NUM_CLASSES)
                    g = assign.get((j, yi, xi))
                    if g is not None:
                        target[t["labels"][g]] = 1.0
                    focal += torchvision.ops.sigmoid_focal_loss(cls_out[j][b, n], target, 0.25, 2.0,
                                                                reduction="sum")
                    if g is None:
                        continue
                    x1, y1, x2, y2 = t["boxes"][g].tolist()
                    l, tp, r, bt = px - x1, py - y1, x2 - px, y2 - py
                    ctr = math.sqrt(min(l, r) / max(l, r) * min(tp, bt) / max(tp, bt))
                    d = reg_out[j][b, n]
                    pred = torch.stack((px - d[0], py - d[1], px + d[2], py + d[3]))
                    giou = torchvision.ops.generalized_box_iou_loss(pred, t["boxes"][g], eps=1e-7)
                    giou_w += giou * ctr
                    ctr_w += ctr
                    ctr_bce += F.binary_cross_entropy_with_logits(ctr_out[j][b, n], torch.tensor(ctr))
    torch.testing.assert_close(losses["loss_cls"], focal / num_pos, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss_bbox"], giou_w / ctr_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss_centerness"], ctr_bce / num_pos, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["gts", "one_empty", "all_empty"])
def test_losses_finite_and_every_parameter_gets_gradient(case):
    head = new_head()
    feats = make_feats(2, requires_grad=True)
    targets, sizes = hand_targets()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    if case == "one_empty":
        targets[1] = empty
    elif case == "all_empty":
        targets = [empty, dict(empty)]
    losses, P = head(feats, targets, sizes)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(torch.isfinite(v) for v in losses.values())
    if case == "all_empty":
        assert losses["loss_bbox"] == 0 and losses["loss_centerness"] == 0
        assert all(p.shape[0] == 0 for p in P.pos_boxes) and all(n.shape[0] > 0 for n in P.neg_boxes)
    if case == "one_empty":
        assert P.pos_boxes[1].shape == (0, 4) and P.pos_feats[1].shape == (0, C_IN)
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert feats[0].grad is not None


def test_predict():
    head = new_head()
    with torch.no_grad():
        head.conv_cls.bias.fill_(2.0)  # confident enough to pass score_thr
    feats = make_feats(2)
    _, sizes = hand_targets()
    out = head.predict(feats, sizes)
    assert len(out) == 2
    for r, (h, w) in zip(out, sizes.tolist()):
        K = r["boxes"].shape[0]
        assert 0 < K <= 100 and r["scores"].shape == (K,) and r["labels"].shape == (K,)
        assert r["labels"].dtype == torch.long and ((r["labels"] >= 0) & (r["labels"] < NUM_CLASSES)).all()
        b = r["boxes"]
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()

    # Constant logits: every score is sigmoid(cls) * sigmoid(centerness).
    with torch.no_grad():
        head.conv_cls.weight.zero_()
        head.conv_centerness.weight.zero_()
        head.conv_centerness.bias.fill_(-1.0)
    out = head.predict(feats, sizes)
    expect = torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(out[0]["scores"], expect.expand_as(out[0]["scores"]))

    # Nothing above score_thr -> empty results with the right shapes.
    with torch.no_grad():
        head.conv_cls.bias.fill_(-10.0)
    r = head.predict(feats, sizes)[0]
    assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].shape == (0,)
