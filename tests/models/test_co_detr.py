"""Co-DETR: the model-level behaviour of collaborative hybrid assignments training."""
import pytest
import torch

from codetr.config import build_model
from codetr.models import DeformableDETRPP
from codetr.models.heads import AuxPositives

SMALL = {"transformer.d_model": 64, "transformer.dim_feedforward": 128, "transformer.num_encoder_layers": 1,
         "transformer.num_decoder_layers": 2, "transformer.n_heads": 4, "num_queries": 30,
         "num_detections": 20, "backbone.pretrained": False}
C = 5


def _batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, 96:] = True
    images[1, :, 96:] = 0
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0], [40.0, 80.0, 56.0, 96.0]]),
                "labels": torch.tensor([1, 4, 2]), "size": torch.tensor([128, 128])},
               {"boxes": torch.tensor([[8.0, 8.0, 100.0, 90.0]]), "labels": torch.tensor([0]),
                "size": torch.tensor([96, 128])}]
    return images, masks, targets


def _model(heads, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("deformable_detr_pp_lite0", C, aux_heads=heads, **SMALL, **kw)


def _strip(losses):
    return {k.removeprefix("one_to_one."): v for k, v in losses.items()}


def test_no_aux_heads_is_exactly_the_baseline():
    co = _model(())
    assert not any(n.startswith(("aux_heads", "adapter", "positive_queries")) for n, _ in co.named_parameters())
    base = co.inference_model()
    assert base is co.detector and type(base) is DeformableDETRPP
    assert list(co.state_dict()) == [f"detector.{k}" for k in base.state_dict()]
    # A fresh detector holding the same weights gives the same losses and detections.
    torch.manual_seed(1)
    other = build_model("deformable_detr_pp_lite0", C, aux_heads=(), **SMALL).detector
    other.load_state_dict(base.state_dict())
    images, masks, targets = _batch()
    torch.manual_seed(3)
    a = _strip(co.train()(images, masks, targets))
    torch.manual_seed(3)
    b = other.train()(images, masks, targets)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with torch.no_grad():
        da, db = co.eval()(images, masks), other.eval()(images, masks)
    for x, y in zip(da, db):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


@pytest.mark.parametrize("heads", [("atss", "rcnn"), ("retina", "fcos")])
def test_losses_keys_weights_and_gradients(heads):
    model = _model(heads).train()
    images, masks, targets = _batch()
    torch.manual_seed(5)
    losses = model(images, masks, targets)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    prefixes = {k.split(".")[0] if not k.startswith("aux.") else ".".join(k.split(".")[:2]) for k in losses}
    assert prefixes == {"one_to_one", *heads, *(f"aux.{h}" for h in heads)}
    # every decoder layer supervises every positive-query group
    for h in heads:
        assert {k for k in losses if k.startswith(f"aux.{h}.")} == {
            f"aux.{h}.{p}loss_{n}" for p in ("", "d0.") for n in ("cls", "bbox", "giou")}

    # The head's own losses, recomputed by calling the head on the adapter output, are
    # weighted by num_decoder_layers * lambda2 = 2 * 2 (R-CNN samples at random: not here).
    with torch.no_grad():
        enc = model.detector.encode(images, masks)
        feats = model.adapter(enc.memory, enc.shapes)
        sizes = torch.stack([t["size"] for t in targets])
        for h in set(heads) - {"rcnn"}:
            own, _ = model.aux_heads[h](feats, targets, sizes)
            for k, v in own.items():
                torch.testing.assert_close(losses[f"{h}.{k}"], 4.0 * v, rtol=1e-4, atol=1e-6)

    # The encoder gets gradient from each head's own losses and from each query group.
    enc_params = list(model.detector.encoder.parameters())
    for h in heads:
        for group in (h, f"aux.{h}"):
            part = sum(v for k, v in losses.items() if k.startswith(group + ".") and
                       (group.startswith("aux.") or not k.startswith("aux.")))
            grads = torch.autograd.grad(part, enc_params, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), group
    model.zero_grad()
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_every_parameter_gets_a_gradient_without_gts():
    model = _model(("atss", "rcnn")).train()
    images, masks, targets = _batch()
    targets = [{**t, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for t in targets]
    losses = model(images, masks, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def _positives(counts, negs, C_feat=4):
    torch.manual_seed(0)
    P = lambda n: dict(b=torch.rand(n, 2) * 40, f=torch.randn(n, C_feat, requires_grad=True))  # noqa: E731
    pos = [P(n) for n in counts]
    neg = [P(n) for n in negs]
    box = lambda p: torch.cat((p["b"], p["b"] + 8), 1)  # noqa: E731
    return AuxPositives(
        pos_boxes=[box(p) for p in pos], pos_labels=[torch.arange(len(p["b"])) % 3 for p in pos],
        pos_gt_boxes=[box(p) + 1 for p in pos], pos_feats=[p["f"] for p in pos],
        neg_boxes=[box(p) for p in neg], neg_feats=[p["f"] for p in neg])


@pytest.mark.parametrize("counts,negs,M", [((3, 0), (20, 20), 9), ((12, 5), (20, 20), 12), ((400, 2), (300, 300), 300),
                                           ((2, 1), (1, 0), 9)])
def test_group_size_subsets_and_negative_padding(counts, negs, M):
    model = _model(("atss",))
    pos = _positives(counts, negs)
    sizes = torch.tensor([[64, 80], [48, 64]])
    boxes, feats, targets = model.make_group(pos, sizes)
    assert boxes.shape == (2, M, 4) and feats.shape == (2, M, 4) and not boxes.requires_grad
    for b, (h, w) in enumerate(sizes.tolist()):
        n_pos = min(counts[b], M)
        assert len(targets[b]["labels"]) == n_pos
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        # positives first: each kept query's box, feature and target come from one positive
        for q in range(n_pos):
            i = int(((pos.pos_feats[b] - feats[b, q]).abs().sum(1) == 0).nonzero()[0])
            xyxy = pos.pos_boxes[b][i] / scale  # not clipped, as the official
            cxcywh = torch.cat(((xyxy[:2] + xyxy[2:]) / 2, xyxy[2:] - xyxy[:2]))
            torch.testing.assert_close(boxes[b, q], cxcywh)
            assert targets[b]["labels"][q] == pos.pos_labels[b][i]
            g = pos.pos_gt_boxes[b][i] / scale
            torch.testing.assert_close(targets[b]["boxes"][q], torch.cat(((g[:2] + g[2:]) / 2, g[2:] - g[:2])))
        # the rest are the image's negatives (cycled when too few), or a whole-image box
        for q in range(n_pos, M):
            if negs[b]:
                assert ((pos.neg_feats[b] - feats[b, q]).abs().sum(1) == 0).any()
            else:
                torch.testing.assert_close(boxes[b, q], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_inference_model_drops_aux_modules_and_gives_identical_detections():
    model = _model(("atss", "rcnn")).eval()
    plain = model.inference_model()
    assert type(plain) is DeformableDETRPP
    names = {n for n, _ in plain.named_parameters()}
    assert not any(n.startswith(("aux_heads", "adapter", "positive_queries")) for n in names)
    assert len(names) < len(list(model.named_parameters()))
    images, masks, _ = _batch()
    with torch.no_grad():
        a, b = model(images, masks), plain(images, masks)
    for x, y in zip(a, b):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    # eval never runs the auxiliary branches
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (model.adapter, *model.aux_heads.values())]
    with torch.no_grad():
        model(images, masks)
    assert calls == []
    for h in hooks:
        h.remove()


def test_eval_head_diagnostic_scales_boxes_to_the_original_image():
    model = _model(("atss",)).eval()
    images, masks, targets = _batch()
    with torch.no_grad():
        out = model(images, masks, eval_head="atss", orig_sizes=torch.tensor([[256, 256], [96, 128]]))
        plain = model(images, masks, eval_head="atss", orig_sizes=torch.tensor([[128, 128], [96, 128]]))
    assert len(out) == 2 and all(k in out[0] for k in ("boxes", "scores", "labels"))
    torch.testing.assert_close(out[0]["boxes"], 2 * plain[0]["boxes"])
    with pytest.raises(ValueError, match="eval_head"):
        model(images, masks, eval_head="fcos")


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ValueError, match="aux_heads: unknown head 'yolo'"):
        _model(("yolo",))


def test_head_options_reach_the_head_and_are_checked():
    assert _model(("rcnn",)).aux_heads["rcnn"].shared_fcs[0].out_features == 1024  # the paper's
    model = _model(("rcnn",), **{"co.head_options": {"rcnn": {"fc_channels": 48}}})
    assert model.aux_heads["rcnn"].shared_fcs[0].out_features == 48
    lite = build_model("co_deformable_detr_lite0", C, **{"backbone.pretrained": False})
    assert lite.aux_heads["rcnn"].shared_fcs[1].out_features == 512  # the CPU preset's deviation
    with pytest.raises(ValueError, match=r"head_options\['rcnn'\]: unknown options \['fc_width'\]"):
        _model(("rcnn",), **{"co.head_options": {"rcnn": {"fc_width": 48}}})
    with pytest.raises(ValueError, match="co.head_options: unknown heads \\['yolo'\\]"):
        _model(("rcnn",), **{"co.head_options": {"yolo": {}}})
