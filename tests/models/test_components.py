import pytest
import torch
import torch.nn.functional as F

from codetr.config import PRESETS, build_detector, get_preset, param_groups
from codetr.models.neck import ChannelMapper, MaskedGroupNorm
from codetr.models.position_encoding import PositionEmbeddingSine
from codetr.models.detector import Memory
from codetr.models.transformer import DeformableDecoder


def test_position_encoding_respects_padding():
    pe = PositionEmbeddingSine(128)
    alone = pe(torch.zeros(1, 6, 5, dtype=torch.bool))
    mask = torch.ones(1, 9, 11, dtype=torch.bool)
    mask[0, :6, :5] = False
    padded = pe(mask)
    assert alone.shape == (1, 256, 6, 5) and padded.shape == (1, 256, 9, 11)
    torch.testing.assert_close(padded[..., :6, :5], alone)


def test_masked_group_norm_equals_group_norm_on_the_valid_region():
    torch.manual_seed(0)
    gn = MaskedGroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 2)
        gn.bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 5, 7)
    padded = torch.randn(1, 8, 9, 10)
    padded[..., :5, :7] = x
    mask = torch.ones(1, 9, 10, dtype=torch.bool)
    mask[0, :5, :7] = False
    out = gn(padded, mask)
    torch.testing.assert_close(out[..., :5, :7], gn(x), atol=1e-5, rtol=1e-5)
    assert (out[..., 5:, :] == 0).all()


def test_channel_mapper_levels():
    neck = ChannelMapper([40, 112, 320], 64, num_extra=1)
    feats = [torch.randn(2, c, s, s) for c, s in ((40, 16), (112, 8), (320, 4))]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]


def _memory(memory, shapes, vr):
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return Memory(memory, torch.zeros(memory.shape[:2], dtype=torch.bool), tuple(map(tuple, shapes.tolist())),
                  shapes, start, vr)


@pytest.mark.parametrize("dynamic", [False, True])
def test_decoder_runs_extra_query_groups(dynamic):
    """Co-DETR's customised positive queries: given content queries, positions and
    reference boxes, one decoder pass per group, or one pass with groups blocked from each
    other."""
    torch.manual_seed(0)
    dec = DeformableDecoder(d_model=32, num_layers=2, dim_ff=64, n_levels=2, n_heads=4, n_points=2,
                            dynamic_query_pos=dynamic).eval()
    mem = _memory(torch.randn(1, 80, 32), torch.tensor([[8, 8], [4, 4]]), torch.ones(1, 2, 2))
    q, pos = torch.randn(1, 6, 32), torch.randn(1, 6, 32)
    boxes = torch.rand(1, 6, 4) * 0.5 + 0.25
    hidden, out_boxes = dec(q, pos, boxes, mem)
    assert hidden.shape == (2, 1, 6, 32) and out_boxes.shape == (2, 1, 6, 4)
    # bbox heads start as the identity: layer-0 boxes equal the references
    torch.testing.assert_close(out_boxes[0], boxes, atol=1e-5, rtol=1e-5)
    # two groups of 3 in one pass with a block-diagonal mask == two separate passes
    blocked = torch.ones(6, 6, dtype=torch.bool)
    blocked[:3, :3] = blocked[3:, 3:] = False
    joint, _ = dec(q, pos, boxes, mem, self_attn_mask=blocked)
    first, _ = dec(q[:, :3], pos[:, :3], boxes[:, :3], mem)
    second, _ = dec(q[:, 3:], pos[:, 3:], boxes[:, 3:], mem)
    torch.testing.assert_close(joint, torch.cat((first, second), 2), atol=1e-5, rtol=1e-5)
    # the memory projected once (shared by the groups) gives the same outputs and gradients
    mem.memory.requires_grad_(True)
    values = dec.project_memory(mem)
    assert len(values) == 2 and values[0].shape == (1, 80, 4, 8)
    shared, _ = dec(q, pos, boxes, mem.with_values(values))
    torch.testing.assert_close(shared, hidden, rtol=0, atol=0)
    g_shared, = torch.autograd.grad(shared.sum(), mem.memory)
    g_plain, = torch.autograd.grad(dec(q, pos, boxes, mem)[0].sum(), mem.memory)
    torch.testing.assert_close(g_shared, g_plain)
    # a static decoder uses the position it is given on every layer: no position, no pass
    if not dynamic:
        with pytest.raises(ValueError, match="query_pos is required"):
            dec(q, None, boxes, mem)


def test_look_forward_twice_gradient_path():
    """Layer 1's box loss reaches layer 0's box head (forward twice), but not through the
    sampling reference of layer 1 (detached)."""
    torch.manual_seed(0)
    dec = DeformableDecoder(d_model=32, num_layers=2, dim_ff=64, n_levels=1, n_heads=4, n_points=2)
    for head in dec.bbox_heads:  # non-zero deltas so gradients are informative
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    mem = _memory(torch.randn(1, 16, 32), torch.tensor([[4, 4]]), torch.ones(1, 1, 2))
    _, boxes = dec(torch.randn(1, 3, 32), torch.randn(1, 3, 32), torch.rand(1, 3, 4) * 0.5 + 0.25, mem)
    boxes[1].sum().backward()
    assert dec.bbox_heads[0].layers[-1].weight.grad.abs().sum() > 0


def test_presets_and_overrides():
    assert set(PRESETS) == {"deformable_detr_pp_r50", "deformable_detr_pp_lite0", "co_deformable_detr_r50",
                            "co_deformable_detr_lite0"}
    assert get_preset("co_deformable_detr_lite0").co.aux_heads == ("atss", "rcnn")
    assert get_preset("deformable_detr_pp_lite0").co.aux_heads == ()
    r50 = get_preset("deformable_detr_pp_r50")
    assert (r50.num_queries, r50.transformer.num_encoder_layers, r50.transformer.num_decoder_layers) == (300, 6, 6)
    assert (r50.optim.lr, r50.optim.weight_decay, r50.optim.grad_clip, r50.optim.epochs) == (2e-4, 1e-4, 0.1, 12)
    assert r50.optim.lr_drop_epochs == (11,) and max(r50.data.train_scales) == 800 and r50.data.max_size == 1333
    model = build_detector("deformable_detr_pp_lite0", 3, transformer__d_model=64, num_queries=20,
                           **{"backbone.pretrained": False, "transformer.n_heads": 4})
    assert model.num_queries == 20 and model.decoder.d_model == 64
    with pytest.raises(KeyError):
        build_detector("deformable_detr_pp_lite0", 3, transformer__nope=1)
    with pytest.raises(KeyError):
        get_preset("nope")
    groups = param_groups(model, get_preset("deformable_detr_pp_lite0").optim)
    low = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in low}
    assert groups[1]["lr"] == pytest.approx(2e-5)
    assert any("sampling_offsets" in n for n in names) and any(n.startswith("backbone") for n in names)
    assert not any("class_heads" in n for n in names)


def test_chunked_ffn_matches_the_plain_linears(monkeypatch):
    """The FFN's chunked, recomputing path against nn.Linear -> ReLU -> nn.Linear on the
    same weights: output and every gradient (float64, several chunks and a short last one),
    gradcheck, and gradients only where asked (frozen weights)."""
    from codetr.models.transformer import FFN, _ChunkedFFN

    monkeypatch.setattr(FFN, "CHUNK", 16)
    torch.manual_seed(0)
    ffn = FFN(8, 24, 0.0).double()
    x = torch.randn(2, 37, 8, dtype=torch.float64)
    w = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def plain(t):
        h = ffn.linear2(F.relu(ffn.linear1(t)))
        return ffn.norm(t + h)

    grads = []
    for f in (ffn, plain):
        xi = x.clone().requires_grad_()
        ffn.zero_grad()
        out = f(xi)
        (out * w).sum().backward()
        grads.append([out, xi.grad] + [p.grad.clone() for p in ffn.parameters()])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)

    params = (ffn.linear1.weight, ffn.linear1.bias, ffn.linear2.weight, ffn.linear2.bias)
    assert torch.autograd.gradcheck(lambda t, *p: _ChunkedFFN.apply(t, *p, 16),
                                    (x[0].clone().requires_grad_(), *params))
    ffn.requires_grad_(False)
    xi = x.clone().requires_grad_()
    ffn.zero_grad()
    ffn(xi).sum().backward()
    assert xi.grad is not None and all(p.grad is None for p in ffn.parameters())
