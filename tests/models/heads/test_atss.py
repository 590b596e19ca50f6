"""ATSS auxiliary head: assignment and positives against a brute-force ATSS written here,
centerness targets and loss normalisations against hand computations, gradients, padding,
predict."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from codetr.config import build_aux_head
from codetr.models.heads import AuxPositives
from codetr.models.heads.atss import ATSSHead, centerness_target

STRIDES = (8, 16, 32, 64, 128)
C_IN, NUM_CLASSES = 8, 3
PADDED_HW = (64, 96)
# Image 0 fills the padded batch; image 1 is 40 x 56 with padding at the bottom/right.
IMAGE_SIZES = torch.tensor([[64, 96], [40, 56]])


def level_shapes():
    return [(math.ceil(PADDED_HW[0] / s), math.ceil(PADDED_HW[1] / s)) for s in STRIDES]


def make_feats(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C_IN, h, w, generator=g).requires_grad_() for h, w in level_shapes()]


def make_targets():
    """Image 0: three gts, two of them overlapping (so an anchor can be a positive candidate
    of both); image 1: a gt reaching the bottom-right corner of its unpadded area, whose
    nearest anchors on the coarse levels include padding ones."""
    return [
        {"boxes": torch.tensor([[10.3, 12.7, 50.1, 41.9], [26.6, 6.2, 88.4, 58.9], [61.7, 30.1, 77.2, 47.6]]),
         "labels": torch.tensor([2, 0, 1])},
        {"boxes": torch.tensor([[3.3, 8.6, 55.1, 39.2]]), "labels": torch.tensor([1])},
    ]


def brute_anchors(octave_base_scale=8.0):
    """All anchors in head order (level, row, column): list of (box [4] list, level, y, x)."""
    out = []
    for j, ((H, W), s) in enumerate(zip(level_shapes(), STRIDES)):
        half = octave_base_scale * s / 2
        for y in range(H):
            for x in range(W):
                cx, cy = x * s, y * s  # mmdetection AnchorGenerator, center_offset=0
                out.append(([cx - half, cy - half, cx + half, cy + half], j, y, x))
    return out


def brute_atss(anchors, image_hw, gts, topk=9, exclude_padding=True):
    """Brute-force ATSS (Zhang et al. 2020) for one image, loops over gts and levels.
    Returns {anchor index: gt index} of the positives and the number of anchors that were
    positive candidates of more than one gt."""
    h, w = image_hw
    boxes = torch.tensor([a[0] for a in anchors])
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    usable = [i for i in range(len(anchors))
              if not exclude_padding or (centres[i, 0] < w and centres[i, 1] < h)]
    iou = torchvision.ops.box_iou(boxes, gts)  # [N, G]
    pos_for = {}
    for g in range(len(gts)):
        gx, gy = float(gts[g, 0] + gts[g, 2]) / 2, float(gts[g, 1] + gts[g, 3]) / 2
        candidates = []
        for j in range(len(STRIDES)):
            level = [i for i in usable if anchors[i][1] == j]
            dist = {i: math.hypot(float(centres[i, 0]) - gx, float(centres[i, 1]) - gy) for i in level}
            candidates += sorted(level, key=lambda i: (dist[i], i))[:topk]
        ious = iou[candidates, g].double()
        thr = ious.mean() + ious.std()
        for i, v in zip(candidates, ious):
            cx, cy = float(centres[i, 0]), float(centres[i, 1])
            inside = min(cx - gts[g, 0], cy - gts[g, 1], gts[g, 2] - cx, gts[g, 3] - cy) > 0.01
            if v >= thr and inside:
                pos_for.setdefault(i, []).append(g)
    assigned = {i: max(gs, key=lambda g: (iou[i, g], -g)) for i, gs in pos_for.items()}
    conflicts = sum(len(gs) > 1 for gs in pos_for.values())
    return dict(sorted(assigned.items())), conflicts


def test_registry_and_layers():
    head = build_aux_head("atss", NUM_CLASSES, in_channels=C_IN)
    assert isinstance(head, ATSSHead) and head.strides == STRIDES
    assert len(head.scales) == len(STRIDES)
    gns = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(gns) == 2 and all(g.num_groups == 8 for g in gns)  # min(32, 8) groups for 8 channels
    assert ATSSHead(NUM_CLASSES, in_channels=64).cls_convs[1].num_groups == 32
    assert ATSSHead(NUM_CLASSES, in_channels=48).cls_convs[1].num_groups == 24
    # Classifier bias at the 0.01 prior.
    assert torch.allclose(head.atss_cls.bias.sigmoid(), torch.full((NUM_CLASSES,), 0.01))


def test_centerness_target_by_hand():
    anchors = torch.tensor([[-44.0, -36.0, 84.0, 92.0], [0.0, 0.0, 10.0, 10.0]])  # centres (20, 28), (5, 5)
    gts = torch.tensor([[4.0, 12.0, 52.0, 36.0], [1.0, 0.0, 9.0, 10.0]])
    # (l, t, r, b) = (16, 16, 32, 8): sqrt(16/32 * 8/16) = 0.5; (4, 5, 4, 5): 1.
    assert torch.allclose(centerness_target(anchors, gts), torch.tensor([0.5, 1.0]))


def test_assignment_and_positives_match_brute_force():
    torch.manual_seed(0)
    head = ATSSHead(NUM_CLASSES, in_channels=C_IN)
    feats, targets = make_feats(), make_targets()
    losses, pos = head(feats, targets, IMAGE_SIZES)
    assert isinstance(pos, AuxPositives)
    anchors = brute_anchors()
    conflicts_seen, padding_matters = 0, False
    for b in range(2):
        hw = IMAGE_SIZES[b].tolist()
        truth, conflicts = brute_atss(anchors, hw, targets[b]["boxes"])
        conflicts_seen += conflicts
        padding_matters |= brute_atss(anchors, hw, targets[b]["boxes"], exclude_padding=False)[0] != truth
        idx = list(truth)
        gt = torch.tensor(list(truth.values()), dtype=torch.long)
        assert len(idx) > 0
        torch.testing.assert_close(pos.pos_boxes[b], torch.tensor([anchors[i][0] for i in idx]))
        assert torch.equal(pos.pos_labels[b], targets[b]["labels"][gt])
        assert torch.equal(pos.pos_gt_boxes[b], targets[b]["boxes"][gt])
        cell_feats = torch.stack([feats[anchors[i][1]][b, :, anchors[i][2], anchors[i][3]] for i in idx])
        torch.testing.assert_close(pos.pos_feats[b], cell_feats)
        # Negatives: valid anchors that are not positive, each with its own cell's feature.
        boxes = torch.tensor([a[0] for a in anchors])
        num_neg = sum(1 for i, a in enumerate(anchors) if i not in truth
                      and (a[0][0] + a[0][2]) / 2 < hw[1] and (a[0][1] + a[0][3]) / 2 < hw[0])
        assert len(pos.neg_boxes[b]) == min(num_neg, head.max_negatives)
        for box, feat in zip(pos.neg_boxes[b], pos.neg_feats[b]):
            i = int((boxes - box).abs().sum(1).argmin())
            assert i not in truth and float((boxes[i] - box).abs().max()) < 1e-4
            torch.testing.assert_close(feat, feats[anchors[i][1]][b, :, anchors[i][2], anchors[i][3]])
    # The hand-built case exercises the tie-break between gts and the padding exclusion.
    assert conflicts_seen > 0 and padding_matters


def test_loss_values_by_hand():
    """With zero prediction weights the outputs are the biases: decoded boxes are the anchors
    themselves, so every loss is a closed form of the brute-force assignment."""
    head = ATSSHead(NUM_CLASSES, in_channels=C_IN)
    cls_bias, ctr_bias = -1.5, 0.3
    with torch.no_grad():
        for conv in (head.atss_cls, head.atss_reg, head.atss_centerness):
            conv.weight.zero_()
            conv.bias.zero_()
        head.atss_cls.bias.fill_(cls_bias)
        head.atss_centerness.bias.fill_(ctr_bias)
    feats, targets = make_feats(), make_targets()
    losses, _ = head(feats, targets, IMAGE_SIZES)
    anchors = brute_anchors()
    boxes = torch.tensor([a[0] for a in anchors])
    focal, giou, ctr_sum, bce, num_pos = 0.0, 0.0, 0.0, 0.0, 0
    for b in range(2):
        h, w = IMAGE_SIZES[b].tolist()
        truth, _ = brute_atss(anchors, (h, w), targets[b]["boxes"])
        valid = ((boxes[:, 0] + boxes[:, 2]) / 2 < w) & ((boxes[:, 1] + boxes[:, 3]) / 2 < h)
        onehot = torch.zeros(len(anchors), NUM_CLASSES)
        for i, g in truth.items():
            onehot[i, targets[b]["labels"][g]] = 1.0
            a, t = boxes[i], targets[b]["boxes"][g]
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            l, r, tp, bt = cx - t[0], t[2] - cx, cy - t[1], t[3] - cy
            c = math.sqrt(min(l, r) / max(l, r) * min(tp, bt) / max(tp, bt))
            giou += c * float(torchvision.ops.generalized_box_iou_loss(a, t))
            ctr_sum += c
            bce += float(F.binary_cross_entropy_with_logits(torch.tensor(ctr_bias), torch.tensor(c)))
        num_pos += len(truth)
        focal += float(torchvision.ops.sigmoid_focal_loss(torch.full((int(valid.sum()), NUM_CLASSES), cls_bias),
                                                         onehot[valid], reduction="sum"))
    assert math.isclose(float(losses["loss_cls"].detach()), focal / num_pos, rel_tol=1e-4)
    assert math.isclose(float(losses["loss_bbox"].detach()), 2.0 * giou / ctr_sum, rel_tol=1e-4)
    assert math.isclose(float(losses["loss_centerness"].detach()), bce / num_pos, rel_tol=1e-4)


@pytest.mark.parametrize("case", ["one_image_without_gts", "batch_without_gts"])
def test_every_loss_reaches_every_parameter(case):
    torch.manual_seed(0)
    head = ATSSHead(NUM_CLASSES, in_channels=C_IN)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    targets = [make_targets()[0], empty] if case == "one_image_without_gts" else [empty, empty]
    feats = make_feats()
    losses, pos = head(feats, targets, IMAGE_SIZES)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    params = list(head.parameters())
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        # autograd.grad raises if a parameter is unused (DDP's requirement).
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    # An image without gts has no positives, only negatives.
    assert len(pos.pos_boxes[1]) == 0 and len(pos.neg_boxes[1]) > 0
    if case == "batch_without_gts":
        assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["loss_centerness"].detach()) == 0.0
    for b in range(2):
        assert not pos.pos_boxes[b].requires_grad and not pos.neg_boxes[b].requires_grad
        assert pos.pos_feats[b].requires_grad and pos.neg_feats[b].requires_grad
        assert pos.pos_feats[b].shape == (len(pos.pos_boxes[b]), C_IN)


def test_padding_anchors_never_positive():
    torch.manual_seed(1)
    head = ATSSHead(NUM_CLASSES, in_channels=C_IN)
    sizes = torch.tensor([[48, 72], [64, 40]])
    # gts covering the whole unpadded image and hugging its bottom-right corner.
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 72.0, 48.0], [40.0, 20.0, 72.0, 48.0]]),
                "labels": torch.tensor([0, 1])},
               {"boxes": torch.tensor([[0.0, 0.0, 40.0, 64.0], [14.0, 36.0, 40.0, 64.0]]),
                "labels": torch.tensor([2, 2])}]
    _, pos = head(make_feats(), targets, sizes)
    for b, (h, w) in enumerate(sizes.tolist()):
        for boxes in (pos.pos_boxes[b], pos.neg_boxes[b]):
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            assert bool((centres[:, 0] < w).all() and (centres[:, 1] < h).all())
        assert set(pos.pos_labels[b].tolist()) == set(targets[b]["labels"].tolist())  # both gts matched


def test_predict():
    head = ATSSHead(NUM_CLASSES, in_channels=C_IN, max_per_img=20)
    with torch.no_grad():
        head.atss_cls.bias.zero_()  # scores around 0.5 * 0.5, above score_thr everywhere
    results = head.predict(make_feats(), IMAGE_SIZES)
    assert len(results) == 2
    for r, (h, w) in zip(results, IMAGE_SIZES.tolist()):
        n = len(r["boxes"])
        assert 0 < n <= 20 and r["boxes"].shape == (n, 4) and r["scores"].shape == (n,) and r["labels"].shape == (n,)
        assert bool((r["boxes"] >= 0).all() and (r["boxes"][:, [0, 2]] <= w).all()
                    and (r["boxes"][:, [1, 3]] <= h).all())
        assert bool((r["scores"][:-1] >= r["scores"][1:]).all())
        assert bool((r["scores"] > 0).all() and (r["scores"] <= 1).all())
        assert bool(((r["labels"] >= 0) & (r["labels"] < NUM_CLASSES)).all())
        assert not r["boxes"].requires_grad
    # At the 0.01 prior nothing passes score_thr = 0.05; the official test setting (0.0)
    # keeps every box NMS leaves.
    assert all(len(r["boxes"]) == 0 for r in
               ATSSHead(NUM_CLASSES, in_channels=C_IN, score_thr=0.05).predict(make_feats(), IMAGE_SIZES))
    assert all(0 < len(r["boxes"]) <= 100 for r in
               ATSSHead(NUM_CLASSES, in_channels=C_IN).predict(make_feats(), IMAGE_SIZES))
