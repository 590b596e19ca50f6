"""Faster R-CNN auxiliary head (codetr/models/heads/rcnn.py) against independent
computations: brute-force anchors and MaxIoU assignment on torchvision's box_iou,
torchvision's batched_nms / roi_align / generalized_box_iou_loss, hand-written losses."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tvo

from codetr.config import build_aux_head
from codetr.models.heads import rcnn
from codetr.models.heads.common import pad_gts

C, NUM_CLASSES, STRIDES = 16, 3, (8, 16, 32, 64, 128)
PAD_HW = (64, 96)


def make_feats(B=2, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, -(-PAD_HW[0] // s), -(-PAD_HW[1] // s), generator=g).requires_grad_(requires_grad)
            for s in STRIDES]


def make_head(**kw):
    torch.manual_seed(0)
    return build_aux_head("rcnn", NUM_CLASSES, in_channels=C, strides=STRIDES, **kw)


def randomise_rpn(head, seed=1):
    """Larger RPN weights than the N(0, 0.01) init, so scores and deltas vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv, std in ((head.rpn_conv, 0.2), (head.rpn_cls, 0.5), (head.rpn_reg, 0.1)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * std)


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


# Image 0 fills the padded batch; image 1 is 40 x 56 (padding at the bottom/right).
SIZES = torch.tensor([[64, 96], [40, 56]])
# Image 0: a gt equal to an anchor, one with 0.76 best IoU, one too small for any anchor,
# one matched only as a low-quality match (best IoU 0.43).
TARGETS = [target([[4., 12., 36., 44.], [40., 16., 88., 60.], [60., 2., 76., 14.], [10., 40., 30., 62.]],
                  [0, 2, 1, 1]),
           target([[20., 4., 54., 38.]], [1])]


# ---------------------------------------------------------------- independent references
def ref_anchors(H, W, s, scales, ratios):
    """Anchors by a plain loop: cell-major, ratios outer, scales inner; ratio = h / w."""
    boxes, centers = [], []
    for y in range(H):
        for x in range(W):
            cx, cy = float(x * s), float(y * s)  # mmdetection AnchorGenerator, center_offset=0
            for r in ratios:
                for k in scales:
                    w = k * s / math.sqrt(r)
                    h = w * r
                    boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                    centers.append([cx, cy])
    return torch.tensor(boxes), torch.tensor(centers)


def ref_max_iou(priors, gts, pos_thr, neg_thr, min_pos, low_quality):
    """mmdetection's MaxIoUAssigner, brute force on torchvision's box_iou: -1/0/k+1."""
    out = torch.full((len(priors),), -1, dtype=torch.long)
    if len(gts) == 0:
        return out.zero_()
    iou = tvo.box_iou(gts.double(), priors.double())  # [G, A]
    for a in range(len(priors)):
        m = iou[:, a].max()
        if m < neg_thr:
            out[a] = 0
        if m >= pos_thr:
            out[a] = int(torch.nonzero(iou[:, a] == m)[0]) + 1
    if low_quality:
        for g in range(len(gts)):
            if iou[g].max() >= min_pos:
                out[iou[g] == iou[g].max()] = g + 1
    return out


def ref_rpn_assign(anchors, centers, targets, sizes):
    rows = []
    for t, (h, w) in zip(targets, sizes.tolist()):
        inside = (centers[:, 0] < w) & (centers[:, 1] < h)
        a = torch.full((len(anchors),), -1, dtype=torch.long)
        a[inside] = ref_max_iou(anchors[inside], t["boxes"], 0.7, 0.3, 0.3, True)
        rows.append(a)
    return torch.stack(rows)


def ref_decode(priors, d, stds, hw=None):
    d = d * torch.tensor(stds)
    m = abs(math.log(16 / 1000))
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    px, py = priors[:, 0] + pw / 2, priors[:, 1] + ph / 2
    x, y = px + d[:, 0] * pw, py + d[:, 1] * ph
    w, h = pw * d[:, 2].clamp(-m, m).exp(), ph * d[:, 3].clamp(-m, m).exp()
    boxes = torch.stack((x - w / 2, y - h / 2, x + w / 2, y + h / 2), 1)
    if hw is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, hw[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, hw[0])
    return boxes


def ref_encode(priors, gts):
    pw, ph = priors[:, 2] - priors[:, 0], priors[:, 3] - priors[:, 1]
    gw, gh = gts[:, 2] - gts[:, 0], gts[:, 3] - gts[:, 1]
    return torch.stack((((gts[:, 0] + gts[:, 2]) - (priors[:, 0] + priors[:, 2])) / 2 / pw,
                        ((gts[:, 1] + gts[:, 3]) - (priors[:, 1] + priors[:, 3])) / 2 / ph,
                        torch.log(gw / pw), torch.log(gh / ph)), 1)


def ref_level(box, finest_scale, num_levels):
    scale = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
    return min(max(math.floor(math.log2(scale / finest_scale + 1e-6)), 0), num_levels - 1)


def ref_pooled_mean(feats, b, box, finest_scale, strides=STRIDES[:4]):
    j = ref_level(box, finest_scale, len(strides))
    roi = torch.cat((torch.tensor([float(b)]), box.float()))[None]
    return tvo.roi_align(feats[j].detach(), roi, 7, 1.0 / strides[j], 0, aligned=True).mean((2, 3))[0], j


# ---------------------------------------------------------------- construction
def test_registry_and_official_config():
    head = make_head()
    assert isinstance(head, rcnn.RCNNHead)
    # 3 octave scales (4 * 2^(i/3)) x 3 ratios, official co_deformable_detr_r50_1x_coco.
    assert head.num_anchors == 9 and head.rpn_cls.out_channels == 9 and head.rpn_reg.out_channels == 36
    assert head.scales == pytest.approx((4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)))
    assert head.roi_align.finest_scale == 112 and head.roi_align.strides == (8, 16, 32, 64)
    assert head.roi_align.aligned and head.roi_align.sampling_ratio == 0 and head.roi_align.output_size == (7, 7)
    assert head.shared_fcs[0].in_features == C * 49 and head.shared_fcs[1].out_features == 1024
    assert head.fc_cls.out_features == NUM_CLASSES + 1 and head.fc_reg.out_features == 4 * NUM_CLASSES
    assert make_head(reg_class_agnostic=True).fc_reg.out_features == 4


def test_anchors_match_loop():
    head = make_head()
    feats = make_feats()
    anchors, centers = head.anchors(feats)
    for a, c, x, s in zip(anchors, centers, feats, STRIDES):
        ra, rc = ref_anchors(x.shape[2], x.shape[3], s, head.scales, head.ratios)
        torch.testing.assert_close(a, ra, rtol=0, atol=1e-4)
        torch.testing.assert_close(c, rc)


# ---------------------------------------------------------------- RPN
def test_rpn_assignment_matches_brute_force():
    head = make_head()
    anchors, centers = head.anchors(make_feats())
    anchors, centers = torch.cat(anchors), torch.cat(centers)
    gt_boxes, gt_counts = pad_gts(TARGETS, "cpu")
    got = head.rpn_assign(anchors, centers, gt_boxes, gt_counts, SIZES)
    want = ref_rpn_assign(anchors, centers, TARGETS, SIZES)
    assert torch.equal(got, want)
    # The case exercises every branch: >= 0.7 positives, low-quality positives, negatives,
    # ignored anchors between the thresholds and in the padding.
    iou0 = tvo.box_iou(TARGETS[0]["boxes"], anchors).max(0).values
    pos0 = got[0] > 0
    assert (iou0[pos0] >= 0.7).any() and ((iou0[pos0] < 0.7) & (iou0[pos0] >= 0.3)).any()
    assert (got == 0).any() and (got[0] == -1).any() and (got[1] > 0).any()


def test_padding_anchors_never_positive():
    head = make_head()
    anchors, centers = head.anchors(make_feats())
    anchors, centers = torch.cat(anchors), torch.cat(centers)
    # Image 1 is 40 x 56; this gt lies mostly in the padding.
    targets = [TARGETS[0], target([[30., 20., 90., 62.]], [0])]
    got = head.rpn_assign(anchors, centers, *pad_gts(targets, "cpu"), SIZES)
    outside = (centers[:, 0] >= 56) | (centers[:, 1] >= 40)
    # Without the padding rule some padding anchors would be positive (the test bites).
    assert (ref_max_iou(anchors, targets[1]["boxes"], 0.7, 0.3, 0.3, True)[outside] > 0).any()
    assert (got[1, outside] == -1).all()
    assert (got[1, ~outside] > 0).any()
    assert torch.equal(got, ref_rpn_assign(anchors, centers, targets, SIZES))


def test_sampler_counts_and_fractions():
    torch.manual_seed(0)
    for n_pos, n_neg, num, frac in ((300, 1000, 256, 0.5), (10, 1000, 256, 0.5), (10, 50, 256, 0.5),
                                    (200, 2000, 512, 0.25), (0, 2000, 512, 0.25)):
        assigned = torch.cat((torch.randint(1, 4, (n_pos,)), torch.zeros(n_neg, dtype=torch.long),
                              torch.full((77,), -1)))[torch.randperm(n_pos + n_neg + 77)]
        pos, neg = rcnn.sample(assigned, num, frac)
        assert pos.numel() == min(n_pos, int(num * frac))
        assert neg.numel() == min(n_neg, num - pos.numel())
        assert (assigned[pos] > 0).all() and (assigned[neg] == 0).all()
        assert pos.unique().numel() == pos.numel() and neg.unique().numel() == neg.numel()
    # Seeded by the global RNG.
    torch.manual_seed(5)
    a = rcnn.sample(assigned, 512, 0.25)
    torch.manual_seed(5)
    b = rcnn.sample(assigned, 512, 0.25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rpn_losses_when_every_anchor_is_sampled():
    """With samplers larger than the image, sampling is the identity: the losses must be
    the BCE over all assigned anchors and the L1 over the positives, both / #assigned."""
    head = make_head(rpn_num=10 ** 6)
    randomise_rpn(head)
    feats = make_feats()
    losses, _ = head(feats, TARGETS, SIZES)
    anchors, centers = (torch.cat(x) for x in head.anchors(feats))
    assigned = ref_rpn_assign(anchors, centers, TARGETS, SIZES)
    logits, deltas = (torch.cat(x, 1) for x in head.rpn_forward(feats))
    cls, reg, n = 0.0, 0.0, 0
    for b, t in enumerate(TARGETS):
        a = assigned[b]
        used = a >= 0
        cls = cls + F.binary_cross_entropy_with_logits(logits[b, used], (a[used] > 0).float(), reduction="sum")
        pos = a > 0
        reg = reg + (deltas[b, pos] - ref_encode(anchors[pos], t["boxes"][a[pos] - 1])).abs().sum()
        n += int(used.sum())
    torch.testing.assert_close(losses["loss_rpn_cls"], cls / n)
    torch.testing.assert_close(losses["loss_rpn_bbox"], reg / n)


def test_proposals_match_torchvision_batched_nms():
    nms_pre, max_props = 40, 25
    head = make_head(train_nms_pre=nms_pre, max_proposals=max_props)
    randomise_rpn(head)
    feats = make_feats()
    logits, deltas = head.rpn_forward(feats)
    anchors, _ = head.anchors(feats)
    got = head.proposals(logits, deltas, anchors, SIZES, nms_pre)
    filtered = []
    for b, (h, w) in enumerate(SIZES.tolist()):
        boxes, scores, lv = [], [], []
        for j, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
            s, order = lg[b].detach().sigmoid().sort(descending=True)
            s, order = s[:nms_pre], order[:nms_pre]
            boxes.append(ref_decode(an[order], dl[b, order].detach(), (1, 1, 1, 1), (h, w)))
            scores.append(s)
            lv.append(torch.full((len(s),), j))
        boxes, scores, lv = torch.cat(boxes), torch.cat(scores), torch.cat(lv)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, lv = boxes[ok], scores[ok], lv[ok]
        keep = tvo.batched_nms(boxes, scores, lv, 0.7)[:max_props]
        filtered.append(bool((~ok).any()))
        assert len(keep) == max_props
        torch.testing.assert_close(got[b][0], boxes[keep], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[b][1], scores[keep])
        assert not got[b][0].requires_grad
    assert any(filtered)  # boxes clipped to nothing (in image 1's padding) were dropped


# ---------------------------------------------------------------- RoI head
def test_roi_assignment_matches_brute_force():
    head = make_head()
    g = torch.Generator().manual_seed(3)
    gts = TARGETS[0]["boxes"]
    # Proposals: jittered copies of the gts (positives and near misses) and random boxes.
    jitter = gts.repeat(6, 1) + torch.randn(6 * len(gts), 4, generator=g) * 6
    xy = torch.rand(30, 2, generator=g) * 70
    rand = torch.cat((xy, xy + 5 + torch.rand(30, 2, generator=g) * 40), 1)
    props = torch.cat((jitter, rand))
    props[:, 2:] = torch.maximum(props[:, 2:], props[:, :2] + 1)
    boxes, assigned = head.roi_assign(props, gts)
    assert torch.equal(boxes, torch.cat((gts, props)))
    want = torch.cat((torch.arange(1, len(gts) + 1), ref_max_iou(props, gts, 0.5, 0.5, 0.5, False)))
    assert torch.equal(assigned, want)
    assert (want[len(gts):] > 0).any() and (want[len(gts):] == 0).any()
    # No gts: every proposal is negative.
    boxes, assigned = head.roi_assign(props, torch.zeros(0, 4))
    assert torch.equal(boxes, props) and (assigned == 0).all()


def test_sampling_budgets_in_forward(monkeypatch):
    calls = []
    real = rcnn.sample

    def spy(assigned, num, frac):
        pos, neg = real(assigned, num, frac)
        calls.append((num, frac, pos.numel(), neg.numel(), int((assigned > 0).sum()), int((assigned == 0).sum())))
        return pos, neg

    monkeypatch.setattr(rcnn, "sample", spy)
    head = make_head(roi_pos_fraction=0.02)  # 10 positive RoIs at most: the cap binds
    randomise_rpn(head)
    _, positives = head(make_feats(), TARGETS, SIZES)
    assert [c[:2] for c in calls] == [(256, 0.5)] * 2 + [(512, 0.02)] * 2
    for num, frac, p, n, avail_p, avail_n in calls:
        assert p == min(avail_p, int(num * frac)) and n == min(avail_n, num - p)
    assert calls[2][4] > 10 and calls[2][2] == 10  # cap exercised on image 0's RoIs
    assert [len(x) for x in positives.pos_boxes] == [calls[2][2], calls[3][2]]


@pytest.mark.parametrize("finest_scale", [112.0, 14.0])
def test_positives_agree_with_brute_force_and_roi_align(finest_scale):
    head = make_head(finest_scale=finest_scale)
    randomise_rpn(head)
    feats = make_feats(requires_grad=True)
    _, pos = head(feats, TARGETS, SIZES)
    levels = set()
    for b, t in enumerate(TARGETS):
        gts, labels = t["boxes"], t["labels"]
        P = len(pos.pos_boxes[b])
        assert 0 < P <= 128
        assert not pos.pos_boxes[b].requires_grad and not pos.pos_gt_boxes[b].requires_grad
        assert pos.pos_feats[b].requires_grad and pos.pos_feats[b].shape == (P, C)
        # Every gt is among the positive RoIs (gts are added as proposals; P < 128 here).
        for g in gts:
            assert (pos.pos_boxes[b] == g).all(1).any()
        # Assigned gt = the best-overlapping gt (IoU >= 0.5), its label.
        iou = tvo.box_iou(pos.pos_boxes[b], gts)
        best = iou.argmax(1)
        assert (iou.max(1).values >= 0.5).all()
        assert torch.equal(pos.pos_gt_boxes[b], gts[best]) and torch.equal(pos.pos_labels[b], labels[best])
        # Negatives: below 0.5 with every gt, at most max_negatives, distinct from positives.
        assert 0 < len(pos.neg_boxes[b]) <= 300 and pos.neg_feats[b].shape == (len(pos.neg_boxes[b]), C)
        assert (tvo.box_iou(pos.neg_boxes[b], gts).max(1).values < 0.5).all()
        # Pooled features: torchvision RoIAlign on the level mmdetection's rule picks.
        for boxes, fts in ((pos.pos_boxes[b], pos.pos_feats[b]), (pos.neg_boxes[b], pos.neg_feats[b])):
            for box, f in zip(boxes, fts):
                want, j = ref_pooled_mean(feats, b, box, finest_scale)
                levels.add(j)
                torch.testing.assert_close(f, want, rtol=1e-4, atol=1e-5)
    if finest_scale == 14.0:
        assert len(levels) >= 3  # the small finest_scale spreads RoIs over the levels


def test_roi_losses_when_every_roi_is_sampled():
    """Samplers larger than the proposals: every RoI is used and returned; the losses are
    recomputed with torchvision RoIAlign / GIoU and a hand-written decode."""
    head = make_head(rpn_num=10 ** 6, roi_num=10 ** 6, max_negatives=10 ** 6, finest_scale=14.0)
    randomise_rpn(head)
    with torch.no_grad():  # non-trivial box deltas
        head.fc_reg.weight.normal_(0, 0.01)
    feats = make_feats()
    losses, pos = head(feats, TARGETS, SIZES)
    ce, giou, n = 0.0, 0.0, 0
    for b in range(len(TARGETS)):
        boxes = torch.cat((pos.pos_boxes[b], pos.neg_boxes[b]))
        labels = torch.cat((pos.pos_labels[b], torch.full((len(pos.neg_boxes[b]),), NUM_CLASSES)))
        x = torch.stack([torch.cat((torch.tensor([float(b)]), bx))[None] for bx in boxes])[:, 0]
        pooled = []
        for r in x:
            j = ref_level(r[1:], 14.0, 4)
            pooled.append(tvo.roi_align(feats[j], r[None], 7, 1.0 / STRIDES[j], 0, aligned=True))
        h = torch.cat(pooled).flatten(1)
        for fc in head.shared_fcs:
            h = F.relu(fc(h))
        ce = ce + F.cross_entropy(head.fc_cls(h), labels, reduction="sum")
        P = len(pos.pos_boxes[b])
        d = head.fc_reg(h[:P]).view(P, NUM_CLASSES, 4)[torch.arange(P), pos.pos_labels[b]]
        pred = ref_decode(pos.pos_boxes[b], d, (0.1, 0.1, 0.2, 0.2))
        giou = giou + tvo.generalized_box_iou_loss(pred, pos.pos_gt_boxes[b], reduction="sum")
        n += len(boxes)
    torch.testing.assert_close(losses["loss_cls"], ce / n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss_bbox"], 10 * giou / n, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- gradients, predict
@pytest.mark.parametrize("case", ["gts", "one_empty", "all_empty"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_every_parameter_gets_a_gradient(case, agnostic):
    head = make_head(reg_class_agnostic=agnostic)
    empty = target([], [])
    targets = {"gts": TARGETS, "one_empty": [TARGETS[0], empty], "all_empty": [empty, empty]}[case]
    feats = make_feats(requires_grad=True)
    losses, pos = head(feats, targets, SIZES)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(f.grad is not None for f in feats[:4])
    for b, t in enumerate(targets):
        assert len(pos.pos_boxes[b]) == len(pos.pos_labels[b]) == len(pos.pos_gt_boxes[b]) == len(pos.pos_feats[b])
        if len(t["boxes"]) == 0:
            assert len(pos.pos_boxes[b]) == 0 and len(pos.neg_boxes[b]) > 0


def test_predict_sane():
    head = make_head()
    randomise_rpn(head)
    with torch.no_grad():
        head.fc_cls.weight.normal_(0, 0.5)
        head.fc_reg.weight.normal_(0, 0.05)
    out = head.predict(make_feats(), SIZES)
    assert len(out) == 2
    for r, (h, w) in zip(out, SIZES.tolist()):
        N = len(r["boxes"])
        assert 0 < N <= 100 and r["boxes"].shape == (N, 4) and r["scores"].shape == r["labels"].shape == (N,)
        assert (r["scores"] > 0.05).all() and (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ((r["labels"] >= 0) & (r["labels"] < NUM_CLASSES)).all()
        b = r["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
