"""The official Co-Deformable-DETR's computations (Sense-X/Co-DETR projects/models/
transformer.py = T, co_deformable_detr_head.py = H), checked against their definitions."""
import math

import pytest
import torch

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.config import build_model
from codetr.models.deformable_detr import PositiveQueryEmbedding
from codetr.models.position_encoding import coord_sine_embed
from codetr.models.transformer import inverse_sigmoid

from test_co_detr import SMALL, C, _batch


def _model(heads=("atss", "rcnn"), **kw):
    torch.manual_seed(0)
    return build_model("deformable_detr_pp_lite0", C, aux_heads=heads, **SMALL, **kw)


def _decoder_positions(model, run):
    """The query_pos every decoder layer receives, for each decoder pass of ``run()``."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
             for layer in model.detector.decoder.layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    L = len(model.detector.decoder.layers)
    return [seen[i:i + L] for i in range(0, len(seen), L)]


def test_static_query_pos_is_computed_once_from_the_selected_proposals():
    """T:318-326: query_pos = first half of LN(pos_trans(sine(top-k))), the same tensor in
    every decoder layer; the positive groups get their own, also constant (T:411-417)."""
    model = _model().train()
    images, masks, targets = _batch()
    det = model.detector
    passes = _decoder_positions(model, lambda: model(images, masks, targets))
    assert len(passes) == 3  # one-to-one, atss, rcnn
    for layers in passes:
        assert all(p is layers[0] for p in layers)
    with torch.no_grad():
        _, pos, ref, _ = det.select_queries(det.encode(images, masks))
        expected = det.pos_trans_norm(det.pos_trans(coord_sine_embed(ref, 32)))[..., :64]
    torch.testing.assert_close(passes[0][0], expected)
    assert det.decoder.ref_point_head is None


def test_dynamic_query_pos_variant_recomputes_per_layer():
    model = _model(query_pos="dynamic").eval()
    images, masks, _ = _batch()
    (layers,) = _decoder_positions(model, lambda: model(images, masks))
    assert not torch.equal(layers[0], layers[1])
    assert not hasattr(model.detector, "pos_trans")


def test_encoder_loss_matches_over_every_token_with_all_class_channels():
    """H:692-705: the two-stage loss is the Hungarian loss of every encoder token's proposal,
    with an all-class classifier and every target given label 0."""
    model = _model(()).train()
    det = model.detector
    images, masks, targets = _batch()
    torch.manual_seed(3)
    losses = model(images, masks, targets)
    from codetr.models.detector import normalise_targets

    with torch.no_grad():
        memory = det.encode(images, masks)
        _, _, _, enc = det.select_queries(memory)
        agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in normalise_targets(targets, masks)]
        n = sum(len(t["labels"]) for t in agnostic)
        expected = det.criterion.single(enc, agnostic, n)
    assert enc["pred_logits"].shape == (2, memory.memory.shape[1], C)
    for k, v in expected.items():
        torch.testing.assert_close(losses[f"one_to_one.enc.{k}"], v, rtol=1e-5, atol=1e-6)
    # the matching may pick any token: here not only the top-K selected ones
    idx = det.criterion.matcher(enc, agnostic)
    assert max(int(q.max()) for q, _ in idx) >= det.num_queries


def test_positive_queries_keep_unclipped_boxes_as_reference_and_clamp_them_in_the_embedding():
    """T:407-417 + H:422: reference = the box; position = split(LN(aux_pos_trans(sine(
    sigmoid(inverse_sigmoid(box))))))[0] + the head's scalar; content adds LN(Linear(feat))."""
    torch.manual_seed(0)
    embed = PositiveQueryEmbedding(16, num_heads=2)
    assert embed.head_embed.shape == (1,)
    boxes = torch.tensor([[[0.5, 0.5, 1.6, 0.4], [0.02, 0.9, 0.1, 2.5]]])  # w or h > 1: border-crossing anchors
    feats = torch.randn(1, 2, 16)
    content, pos, ref = embed(boxes, feats)
    assert torch.equal(ref, boxes)
    emb = embed.pos_norm(embed.pos_trans(coord_sine_embed(boxes.clamp(1e-5, 1 - 1e-5), 8)))
    torch.testing.assert_close(pos, emb[..., :16] + embed.head_embed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(content, emb[..., 16:] + embed.feat_norm(embed.feat_trans(feats)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("K,width", [(1, 1), (2, 1), (3, 1), (2, 64)])
def test_head_embedding_init_is_the_official_xavier_table(K, width):
    """nn.Embedding(K, 1, 1, C).weight is [K, 1]; xavier_uniform_ bounds it by
    sqrt(6 / (1 + K)) (T:159, mmdet's transformer init)."""
    torch.manual_seed(0)
    values = torch.stack([PositiveQueryEmbedding(64, K, "scalar" if width == 1 else "vector").head_embed.detach()
                          for _ in range(400)])
    bound = math.sqrt(6 / (width + K))
    assert values.abs().max() <= bound and values.abs().max() > 0.95 * bound
    assert abs(float(values.std()) - bound / math.sqrt(3)) < 0.1 * bound


def test_transformer_matrices_are_xavier_and_detections_are_clamped():
    model = _model(()).eval()
    det = model.detector
    w = det.encoder.layers[0].ffn.linear1.weight  # [128, 64]: xavier bound sqrt(6 / 192)
    assert float(w.abs().max()) <= math.sqrt(6 / 192) and float(w.abs().max()) > 0.9 * math.sqrt(6 / 192)
    images, masks, _ = _batch()
    with torch.no_grad():
        out = det.detect(det.encode(images, masks))
        out["pred_boxes"] = out["pred_boxes"] * 3 - 1  # boxes far outside the image
        dets = det.postprocess(out, torch.tensor([[100, 200], [50, 60]]))
    for d, (h, w_) in zip(dets, ((100, 200), (50, 60))):
        assert (d["boxes"] >= 0).all() and (d["boxes"][:, 0::2] <= w_).all() and (d["boxes"][:, 1::2] <= h).all()
        assert (d["boxes"][:, 0::2] == w_).any() or (d["boxes"][:, 0::2] == 0).any()


def test_neck_convs_have_no_bias_and_official_group_norm_sees_padding():
    model = _model(())
    assert all(c.bias is None for c in [*model.detector.neck.convs, *model.detector.neck.extra_convs])
    assert model.detector.batch_invariant is False
