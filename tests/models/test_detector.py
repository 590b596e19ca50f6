import pytest
import torch

from codetr.config import build_detector

SMALL = {"transformer.d_model": 64, "transformer.dim_feedforward": 128, "transformer.num_encoder_layers": 2,
         "transformer.num_decoder_layers": 2, "transformer.n_heads": 4, "num_queries": 30,
         "num_detections": 20, "backbone.pretrained": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("deformable_detr_pp_lite0", 5, **SMALL)


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]),
             "labels": torch.tensor([1, 4]), "size": torch.tensor([128, 128]), "orig_size": torch.tensor([256, 256])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "size": torch.tensor([96, 128]), "orig_size": torch.tensor([96, 128])}]


def _batch():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, 96:] = True
    images[1, :, 96:] = 0
    return images, masks


def test_train_losses_and_every_parameter_gets_a_gradient(model):
    images, masks = _batch()
    model.train()
    model.zero_grad()
    losses = model(images, masks, _targets())
    names = ["loss_cls", "loss_bbox", "loss_giou"]
    assert set(losses) == {p + n for p in ("", "d0.", "enc.") for n in names}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone._conv_stem", "backbone._blocks.0.", "backbone._blocks.1.",
                                        "backbone._blocks.2.")) for n in frozen)


def test_eval_outputs_in_original_coordinates(model):
    images, masks = _batch()
    model.eval()
    with torch.no_grad():
        out = model(images, masks, _targets())
        raw_enc = model.encode(images, masks)
        query, query_pos, ref, enc_out = model.select_queries(raw_enc)
        dec = model.decode_group(query, query_pos, ref, raw_enc)
    assert len(out) == 2
    for o in out:
        assert set(o) == {"boxes", "scores", "labels"}
        assert o["boxes"].shape == (20, 4) and o["scores"].shape == (20,) and o["labels"].dtype == torch.int64
        assert (o["scores"][:-1] >= o["scores"][1:]).all()
        plain = model(images, masks)  # no sizes given: the unpadded image sizes
    # image 0 was resized 256 -> 128: its boxes are scaled back to the 256 px original
    torch.testing.assert_close(out[0]["boxes"], 2 * plain[0]["boxes"])
    torch.testing.assert_close(out[1]["boxes"], plain[1]["boxes"])
    assert plain[0]["boxes"].max() <= 128 + 1e-3 and plain[1]["boxes"][:, 1::2].max() <= 96 + 1e-3
    assert query.shape == (2, 30, 64) and query_pos.shape == (2, 30, 64) and ref.shape == (2, 30, 4)
    # the official encoder loss covers every token, classified over all classes
    S = raw_enc.memory.shape[1]
    assert enc_out["pred_logits"].shape == (2, S, 5) and enc_out["pred_boxes"].shape == (2, S, 4)
    assert dec["pred_logits"].shape == (2, 30, 5) and dec["pred_boxes"].shape == (2, 30, 4)
    assert len(dec["aux_outputs"]) == 1
    assert torch.isfinite(ref).all() and ((ref > 0) & (ref <= 1)).all()
    # boxes are clamped to the image, as the official
    assert (plain[1]["boxes"] >= 0).all() and (plain[1]["boxes"][:, 1::2] <= 96).all()


def test_padding_does_not_change_predictions():
    """With batch_invariant=True (our option; the official GroupNorm sees the padding)."""
    torch.manual_seed(0)
    model = build_detector("deformable_detr_pp_lite0", 5, batch_invariant=True, encoder_head="agnostic", **SMALL)
    model.eval()
    torch.manual_seed(2)
    small = torch.randn(1, 3, 128, 128)
    big = torch.randn(1, 3, 192, 256)
    images = torch.zeros(2, 3, 192, 256)
    images[0, :, :128, :128] = small[0]
    images[1] = big[0]
    masks = torch.ones(2, 192, 256, dtype=torch.bool)
    masks[0, :128, :128] = False
    masks[1] = False
    with torch.no_grad():
        alone_enc = model.encode(small, torch.zeros(1, 128, 128, dtype=torch.bool))
        batch_enc = model.encode(images, masks)
        S0 = alone_enc.memory.shape[1]
        valid = ~batch_enc.padding_mask[0]
        torch.testing.assert_close(batch_enc.memory[0][valid], alone_enc.memory[0], atol=1e-4, rtol=1e-4)
        assert int(valid.sum()) == S0
        alone = model(small, torch.zeros(1, 128, 128, dtype=torch.bool))[0]
        both = model(images, masks)[0]
    torch.testing.assert_close(both["scores"], alone["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both["boxes"], alone["boxes"], atol=1e-3, rtol=1e-4)
    assert torch.equal(both["labels"], alone["labels"])


def test_r50_preset_builds_and_runs():
    torch.manual_seed(0)
    model = build_detector("deformable_detr_pp_r50", 80).eval()
    assert len(model.encoder.layers) == 6 and len(model.decoder.layers) == 6 and model.num_queries == 300
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))
    assert out[0]["boxes"].shape == (100, 4) and int(out[0]["labels"].max()) < 80


def test_bf16_autocast_training_step_is_finite(model):
    images, masks = _batch()
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, masks, _targets())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
