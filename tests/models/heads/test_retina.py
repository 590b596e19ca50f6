"""RetinaNet auxiliary head: anchors, max-IoU assignment and positives against a brute-force
assigner written here, loss normalisations by hand, gradients, padding, predict."""
import math

import pytest
import torch
import torchvision

from codetr.config import build_aux_head
from codetr.models.heads import AuxPositives
from codetr.models.heads.retina import RetinaHead

STRIDES = (8, 16, 32, 64, 128)
C_IN, NUM_CLASSES = 8, 3
PADDED_HW = (64, 96)
IMAGE_SIZES = torch.tensor([[64, 96], [40, 56]])


def level_shapes():
    return [(math.ceil(PADDED_HW[0] / s), math.ceil(PADDED_HW[1] / s)) for s in STRIDES]


def make_feats(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C_IN, h, w, generator=g).requires_grad_() for h, w in level_shapes()]


def make_targets():
    """Image 0: a gt matched above 0.5, two overlapping gts, and a 6 x 6 box that no anchor
    covers at IoU 0.4 (low-quality matches only); image 1: a gt at the bottom-right of
    its unpadded area."""
    return [
        {"boxes": torch.tensor([[4.2, 6.9, 37.5, 40.3], [44.6, 8.1, 92.3, 57.9], [50.2, 20.6, 90.7, 62.2],
                                [12.0, 49.0, 18.0, 55.0]]),
         "labels": torch.tensor([0, 1, 2, 1])},
        {"boxes": torch.tensor([[14.6, 9.2, 55.3, 39.6]]), "labels": torch.tensor([2])},
    ]


def brute_anchors():
    """All anchors in head order (level, row, column, ratio, scale): (box list, level, y, x);
    RetinaNet's sizes 4 * 2^(i/3) strides, ratios h / w in (0.5, 1, 2)."""
    out = []
    for j, ((H, W), s) in enumerate(zip(level_shapes(), STRIDES)):
        for y in range(H):
            for x in range(W):
                cx, cy = x * s, y * s  # mmdetection AnchorGenerator, center_offset=0
                for r in (0.5, 1.0, 2.0):
                    for i in range(3):
                        size = 4 * 2 ** (i / 3) * s
                        w, h = size / math.sqrt(r), size * math.sqrt(r)
                        out.append(([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], j, y, x))
    return out


def brute_max_iou(boxes, image_hw, gts):
    """Brute-force RetinaNet assignment for one image (MaxIoUAssigner 0.5 / 0.4, min_pos_iou
    0, every anchor reaching a gt's best IoU taken by it): list of -1 ignored, 0 negative,
    g + 1 gt g. Anchors whose centre is in the padding are removed before assigning."""
    h, w = image_hw
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    usable = [i for i in range(len(boxes)) if centres[i, 0] < w and centres[i, 1] < h]
    iou = torchvision.ops.box_iou(boxes, gts)  # [N, G] float32, mmdetection's formula
    assigned = [-1] * len(boxes)
    for i in usable:
        best = max(range(len(gts)), key=lambda g: (iou[i, g], -g))
        if iou[i, best] >= 0.5:
            assigned[i] = best + 1
        elif iou[i, best] < 0.4:
            assigned[i] = 0
    for g in range(len(gts)):
        m = max(iou[i, g] for i in usable)
        for i in usable:
            if iou[i, g] == m:
                assigned[i] = g + 1
    return assigned


def test_registry_anchors_and_layers():
    head = build_aux_head("retina", NUM_CLASSES, in_channels=C_IN)
    assert isinstance(head, RetinaHead) and head.num_anchors == 9
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.cls_convs) == 1  # Co-DETR's light towers
    assert sum(isinstance(m, torch.nn.Conv2d) for m in RetinaHead(NUM_CLASSES, in_channels=C_IN,
                                                                  stacked_convs=4).reg_convs) == 4
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in head.modules())
    anchors, num_per_level, cells = head.anchors(make_feats())
    truth = brute_anchors()
    torch.testing.assert_close(anchors, torch.tensor([a[0] for a in truth]))
    assert num_per_level == [9 * h * w for h, w in level_shapes()]
    offsets = [0]
    for h, w in level_shapes():
        offsets.append(offsets[-1] + h * w)
    W = [w for _, w in level_shapes()]
    assert cells.tolist() == [offsets[j] + y * W[j] + x for _, j, y, x in truth]


def test_assignment_and_positives_match_brute_force():
    torch.manual_seed(0)
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN)
    feats, targets = make_feats(), make_targets()
    _, pos = head(feats, targets, IMAGE_SIZES)
    assert isinstance(pos, AuxPositives)
    anchors = brute_anchors()
    # The head's anchors (checked against brute_anchors above) so that exact IoU ties, which
    # decide the low-quality matches, are the same floats on both sides.
    boxes = head.anchors(feats)[0]
    for b in range(2):
        hw = IMAGE_SIZES[b].tolist()
        gts = targets[b]["boxes"]
        truth = brute_max_iou(boxes, hw, gts)
        idx = [i for i, a in enumerate(truth) if a > 0]
        gt = torch.tensor([truth[i] - 1 for i in idx])
        assert set(gt.tolist()) == set(range(len(gts)))  # every gt has a positive
        torch.testing.assert_close(pos.pos_boxes[b], boxes[idx])
        assert torch.equal(pos.pos_labels[b], targets[b]["labels"][gt])
        assert torch.equal(pos.pos_gt_boxes[b], gts[gt])
        # The 9 anchors of a cell share the cell's feature.
        cell_feats = torch.stack([feats[anchors[i][1]][b, :, anchors[i][2], anchors[i][3]] for i in idx])
        torch.testing.assert_close(pos.pos_feats[b], cell_feats)
        negatives = [i for i, a in enumerate(truth) if a == 0]
        assert len(pos.neg_boxes[b]) == min(len(negatives), head.max_negatives)
        for box, feat in zip(pos.neg_boxes[b], pos.neg_feats[b]):
            i = int((boxes - box).abs().sum(1).argmin())
            assert truth[i] == 0 and torch.equal(boxes[i], box)
            torch.testing.assert_close(feat, feats[anchors[i][1]][b, :, anchors[i][2], anchors[i][3]])
    # The small box's matches are low-quality ones.
    assert float(torchvision.ops.box_iou(boxes, targets[0]["boxes"][3:]).max()) < 0.4


def test_low_quality_match_takes_every_tied_anchor():
    """One 32 x 32 anchor per cell at stride 8 (exact floats): a 6 x 6 gt centred at
    (15, 52) lies inside the anchors of centres (mmdetection's cell corners) x in {8, 16, 24},
    y in {40, 48, 56} (64 is on the 64 px image's border: not a valid anchor),
    all at IoU 36 / 1024 < 0.4; every one of them becomes positive (gt_max_assign_all)."""
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN, ratios=(1.0,), scales_per_octave=1)
    targets = [{"boxes": torch.tensor([[12.0, 49.0, 18.0, 55.0]]), "labels": torch.tensor([1])}]
    _, pos = head(make_feats(B=1), targets, IMAGE_SIZES[:1])
    truth = torch.tensor([[x - 16.0, y - 16.0, x + 16.0, y + 16.0] for y in (40, 48, 56) for x in (8, 16, 24)])
    assert torch.equal(pos.pos_boxes[0], truth)
    assert pos.pos_labels[0].tolist() == [1] * 9


def test_loss_values_by_hand():
    """Zero prediction weights: the logits are the bias and the decoded boxes the anchors."""
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN)
    cls_bias = -1.5
    with torch.no_grad():
        for conv in (head.retina_cls, head.retina_reg):
            conv.weight.zero_()
            conv.bias.zero_()
        head.retina_cls.bias.fill_(cls_bias)
    feats, targets = make_feats(), make_targets()
    losses, _ = head(feats, targets, IMAGE_SIZES)
    boxes = head.anchors(feats)[0]
    focal, giou, num_pos = 0.0, 0.0, 0
    for b in range(2):
        truth = brute_max_iou(boxes, IMAGE_SIZES[b].tolist(), targets[b]["boxes"])
        used = [i for i, a in enumerate(truth) if a >= 0]
        onehot = torch.zeros(len(used), NUM_CLASSES)
        for row, i in enumerate(used):
            if truth[i] > 0:
                onehot[row, targets[b]["labels"][truth[i] - 1]] = 1.0
                giou += float(torchvision.ops.generalized_box_iou_loss(boxes[i], targets[b]["boxes"][truth[i] - 1]))
                num_pos += 1
        focal += float(torchvision.ops.sigmoid_focal_loss(torch.full((len(used), NUM_CLASSES), cls_bias), onehot,
                                                         reduction="sum"))
    assert math.isclose(float(losses["loss_cls"].detach()), focal / num_pos, rel_tol=1e-4)
    assert math.isclose(float(losses["loss_bbox"].detach()), 2.0 * giou / num_pos, rel_tol=1e-4)


@pytest.mark.parametrize("case", ["one_image_without_gts", "batch_without_gts"])
def test_every_loss_reaches_every_parameter(case):
    torch.manual_seed(0)
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    targets = [make_targets()[0], empty] if case == "one_image_without_gts" else [empty, empty]
    losses, pos = head(make_feats(), targets, IMAGE_SIZES)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    params = list(head.parameters())
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        grads = torch.autograd.grad(loss, params, retain_graph=True)  # raises on an unused parameter
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert len(pos.pos_boxes[1]) == 0 and len(pos.neg_boxes[1]) == head.max_negatives
    if case == "batch_without_gts":
        assert float(losses["loss_bbox"].detach()) == 0.0
    for b in range(2):
        assert not pos.pos_boxes[b].requires_grad and not pos.neg_boxes[b].requires_grad
        assert pos.pos_feats[b].requires_grad and pos.neg_feats[b].requires_grad
        assert pos.pos_feats[b].shape == (len(pos.pos_boxes[b]), C_IN)


def test_padding_anchors_never_positive_or_negative():
    torch.manual_seed(1)
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN, max_negatives=10 ** 6)
    sizes = torch.tensor([[48, 72], [64, 40]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 72.0, 48.0], [52.0, 30.0, 72.0, 48.0]]),
                "labels": torch.tensor([0, 1])},
               {"boxes": torch.tensor([[0.0, 0.0, 40.0, 64.0], [24.0, 44.0, 40.0, 64.0]]),
                "labels": torch.tensor([2, 2])}]
    _, pos = head(make_feats(), targets, sizes)
    for b, (h, w) in enumerate(sizes.tolist()):
        for boxes in (pos.pos_boxes[b], pos.neg_boxes[b]):
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            assert bool((centres[:, 0] < w).all() and (centres[:, 1] < h).all())
        assert set(pos.pos_labels[b].tolist()) == set(targets[b]["labels"].tolist())


def test_predict():
    head = RetinaHead(NUM_CLASSES, in_channels=C_IN, max_per_img=30)
    with torch.no_grad():
        head.retina_cls.bias.zero_()
    results = head.predict(make_feats(), IMAGE_SIZES)
    assert len(results) == 2
    for r, (h, w) in zip(results, IMAGE_SIZES.tolist()):
        n = len(r["boxes"])
        assert 0 < n <= 30 and r["boxes"].shape == (n, 4) and r["scores"].shape == (n,) and r["labels"].shape == (n,)
        assert bool((r["boxes"] >= 0).all() and (r["boxes"][:, [0, 2]] <= w).all()
                    and (r["boxes"][:, [1, 3]] <= h).all())
        assert bool((r["scores"][:-1] >= r["scores"][1:]).all())
        assert bool((r["scores"] > head.score_thr).all() and (r["scores"] <= 1).all())
        assert bool(((r["labels"] >= 0) & (r["labels"] < NUM_CLASSES)).all())
        # Class-wise NMS at 0.5: no two kept boxes of one class overlap above it.
        for c in r["labels"].unique():
            iou = torchvision.ops.box_iou(r["boxes"][r["labels"] == c], r["boxes"][r["labels"] == c])
            assert float((iou - torch.eye(len(iou))).max()) <= 0.5
