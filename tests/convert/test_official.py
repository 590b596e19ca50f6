"""The official Co-Deformable-DETR checkpoint layout (Sense-X/Co-DETR) <-> ours.

No released checkpoint can be downloaded here, so ``official_spec`` writes out the official
R50 model's state-dict names and shapes from its code (file and line below). Its naming
conventions are checked against the key list of mmdetection's Co-DINO, built by the
executed mmdet / mmcv modules (../shared/oracles/mmdet/keys/co_dino_r50.json), which uses
the same ResNet, ChannelMapper, BaseTransformerLayer, RPN, RoI and ATSS modules; the totals
are the released checkpoint's (676 keys, 65.18M values; 624 / 47.65M at inference).
"""
import json
import re
from pathlib import Path

import pytest
import torch

from codetr.config import build_model
from codetr.convert import from_official, to_official

ORACLE_KEYS = Path(__file__).resolve().parents[3] / "shared" / "oracles" / "mmdet" / "keys" / "co_dino_r50.json"
# Keys of the official Co-Deformable-DETR that Co-DINO does not have (T = projects/models/
# transformer.py, H = projects/models/co_deformable_detr_head.py).
CO_DEFORMABLE_ONLY = {
    "query_head.transformer.pos_trans.{weight,bias}",  # mmdet DeformableDetrTransformer (two-stage)
    "query_head.transformer.pos_trans_norm.{weight,bias}",
    "query_head.transformer.pos_feats_trans.N.{weight,bias}",  # T:159-170, with_coord_feat
    "query_head.transformer.pos_feats_norm.N.{weight,bias}",
    "query_head.transformer.head_pos_embed.weight",  # T:159, nn.Embedding(K, 1, 1, C): [K, 1]
    "query_head.query_embedding.weight",  # H:82-84, mixed selection content
}


def _expand(pattern):
    m = re.search(r"\{(.*)\}", pattern)
    return [pattern[:m.start()] + p + pattern[m.end():] for p in m[1].split(",")] if m else [pattern]


def official_spec(C=80, L=6, K=2, d=256, ff=2048, levels=4, queries=300):
    """name -> shape of projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py."""
    spec = {}
    oracle = dict((k, tuple(s)) for k, s in json.loads(ORACLE_KEYS.read_text())["keys"])
    # backbone: mmdet ResNet depth 50, the same module as Co-DINO's (all stages' keys).
    spec.update({k: s for k, s in oracle.items() if k.startswith("backbone.")})
    # neck: ChannelMapper([512, 1024, 2048] -> 256, 1x1, GN 32, num_outs 4): ConvModules.
    for i, c in enumerate((512, 1024, 2048)):
        spec[f"neck.convs.{i}.conv.weight"] = (d, c, 1, 1)
        spec[f"neck.convs.{i}.gn.weight"] = spec[f"neck.convs.{i}.gn.bias"] = (d,)
    spec["neck.extra_convs.0.conv.weight"] = (d, 2048, 3, 3)
    spec["neck.extra_convs.0.gn.weight"] = spec["neck.extra_convs.0.gn.bias"] = (d,)
    t = "query_head.transformer"
    spec[f"{t}.level_embeds"] = (levels, d)

    def msda(prefix):
        spec[f"{prefix}.sampling_offsets.weight"], spec[f"{prefix}.sampling_offsets.bias"] = (8 * levels * 4 * 2, d), (
            8 * levels * 4 * 2,)
        spec[f"{prefix}.attention_weights.weight"], spec[f"{prefix}.attention_weights.bias"] = (8 * levels * 4, d), (
            8 * levels * 4,)
        for n in ("value_proj", "output_proj"):
            spec[f"{prefix}.{n}.weight"], spec[f"{prefix}.{n}.bias"] = (d, d), (d,)

    def ffn_norms(prefix, n_norms):
        spec[f"{prefix}.ffns.0.layers.0.0.weight"], spec[f"{prefix}.ffns.0.layers.0.0.bias"] = (ff, d), (ff,)
        spec[f"{prefix}.ffns.0.layers.1.weight"], spec[f"{prefix}.ffns.0.layers.1.bias"] = (d, ff), (d,)
        for j in range(n_norms):
            spec[f"{prefix}.norms.{j}.weight"] = spec[f"{prefix}.norms.{j}.bias"] = (d,)

    for i in range(6):  # encoder: ('self_attn', 'norm', 'ffn', 'norm')
        msda(f"{t}.encoder.layers.{i}.attentions.0")
        ffn_norms(f"{t}.encoder.layers.{i}", 2)
    for i in range(L):  # decoder: ('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')
        a = f"{t}.decoder.layers.{i}.attentions.0.attn"
        spec[f"{a}.in_proj_weight"], spec[f"{a}.in_proj_bias"] = (3 * d, d), (3 * d,)
        spec[f"{a}.out_proj.weight"], spec[f"{a}.out_proj.bias"] = (d, d), (d,)
        msda(f"{t}.decoder.layers.{i}.attentions.1")
        ffn_norms(f"{t}.decoder.layers.{i}", 3)
    for n, shape in (("enc_output", (d, d)), ("pos_trans", (2 * d, 2 * d))):
        spec[f"{t}.{n}.weight"], spec[f"{t}.{n}.bias"] = shape, shape[:1]
        spec[f"{t}.{n}_norm.weight"] = spec[f"{t}.{n}_norm.bias"] = shape[:1]
    spec[f"{t}.head_pos_embed.weight"] = (K, 1)
    for i in range(K):
        spec[f"{t}.aux_pos_trans.{i}.weight"], spec[f"{t}.aux_pos_trans.{i}.bias"] = (2 * d, 2 * d), (2 * d,)
        spec[f"{t}.aux_pos_trans_norm.{i}.weight"] = spec[f"{t}.aux_pos_trans_norm.{i}.bias"] = (2 * d,)
        spec[f"{t}.pos_feats_trans.{i}.weight"], spec[f"{t}.pos_feats_trans.{i}.bias"] = (d, d), (d,)
        spec[f"{t}.pos_feats_norm.{i}.weight"] = spec[f"{t}.pos_feats_norm.{i}.bias"] = (d,)
    for i in range(L + 1):  # with_box_refine + as_two_stage: L + 1 independent branches
        spec[f"query_head.cls_branches.{i}.weight"], spec[f"query_head.cls_branches.{i}.bias"] = (C, d), (C,)
        for j, shape in ((0, (d, d)), (2, (d, d)), (4, (4, d))):
            spec[f"query_head.reg_branches.{i}.{j}.weight"], spec[f"query_head.reg_branches.{i}.{j}.bias"] = (
                shape, shape[:1])
    spec["query_head.query_embedding.weight"] = (queries, d)
    spec["query_head.downsample.0.weight"], spec["query_head.downsample.0.bias"] = (d, d, 3, 3), (d,)
    spec["query_head.downsample.1.weight"] = spec["query_head.downsample.1.bias"] = (d,)
    # RPNHead: 9 anchors; StandardRoIHead + Shared2FCBBoxHead 1024, class-specific boxes; ATSS.
    spec["rpn_head.rpn_conv.weight"], spec["rpn_head.rpn_conv.bias"] = (d, d, 3, 3), (d,)
    spec["rpn_head.rpn_cls.weight"], spec["rpn_head.rpn_cls.bias"] = (9, d, 1, 1), (9,)
    spec["rpn_head.rpn_reg.weight"], spec["rpn_head.rpn_reg.bias"] = (36, d, 1, 1), (36,)
    b = "roi_head.0.bbox_head"
    for name, shape in (("shared_fcs.0", (1024, d * 49)), ("shared_fcs.1", (1024, 1024)), ("fc_cls", (C + 1, 1024)),
                        ("fc_reg", (4 * C, 1024))):
        spec[f"{b}.{name}.weight"], spec[f"{b}.{name}.bias"] = shape, shape[:1]
    for tower in ("cls_convs", "reg_convs"):
        spec[f"bbox_head.0.{tower}.0.conv.weight"] = (d, d, 3, 3)
        spec[f"bbox_head.0.{tower}.0.gn.weight"] = spec[f"bbox_head.0.{tower}.0.gn.bias"] = (d,)
    for name, out in (("atss_cls", C), ("atss_reg", 4), ("atss_centerness", 1)):
        spec[f"bbox_head.0.{name}.weight"], spec[f"bbox_head.0.{name}.bias"] = (out, d, 3, 3), (out,)
    for j in range(5):
        spec[f"bbox_head.0.scales.{j}.scale"] = ()
    return spec


def _pattern(key):
    return re.sub(r"\.\d+(?=\.|$)", ".N", key)


@pytest.fixture(scope="module")
def spec():
    if not ORACLE_KEYS.is_file():
        pytest.fail(f"{ORACLE_KEYS} is missing: ../shared must be beside the repository")
    return official_spec()


def _official_state(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 10, s, generator=g) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=g)) for k, s in spec.items()}


def test_spec_is_the_released_layout(spec):
    assert len(spec) == 676
    assert sum(torch.Size(s).numel() for s in spec.values()) == pytest.approx(65.18e6, abs=0.005e6)
    inference = [k for k in spec if not k.startswith(("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample",
                                                       "query_head.transformer.aux_pos", "query_head.transformer.pos_feats",
                                                       "query_head.transformer.head_pos_embed"))]
    assert len(inference) == 624
    assert sum(torch.Size(spec[k]).numel() for k in inference) == pytest.approx(47.65e6, abs=0.005e6)
    # Every naming convention is one the executed mmdet modules produce, or one of the
    # official Co-Deformable-DETR's own modules.
    oracle = {_pattern(k) for k, _ in json.loads(ORACLE_KEYS.read_text())["keys"]}
    own = {p for q in CO_DEFORMABLE_ONLY for p in _expand(q)}
    assert {_pattern(k) for k in spec} - oracle - own == set()


def test_official_converts_loads_strictly_and_round_trips(spec):
    model = build_model("co_deformable_detr_r50", 80)
    official = _official_state(spec)
    state, report = from_official(model, {"state_dict": official, "meta": {}})
    assert report.mapped == len(model.state_dict()) and not report.dropped and not report.reinitialised
    model.load_state_dict(state, strict=True)
    back = to_official(model, model.state_dict())
    assert back.keys() == official.keys()
    for k in official:
        assert torch.equal(back[k], official[k].to(back[k].dtype)), k
    # Groups by name: the official head 0 is Faster R-CNN, 1 is ATSS (our dict order is atss, rcnn).
    pq = "query_head.transformer"
    torch.testing.assert_close(state["positive_queries.rcnn.pos_trans.weight"], official[f"{pq}.aux_pos_trans.0.weight"])
    torch.testing.assert_close(state["positive_queries.atss.feat_norm.bias"], official[f"{pq}.pos_feats_norm.1.bias"])
    torch.testing.assert_close(state["positive_queries.atss.head_embed"], official[f"{pq}.head_pos_embed.weight"][1])


def test_ema_keys_and_training_branches_are_dropped_with_reasons(spec):
    official = _official_state(spec)
    official["ema_backbone_conv1_weight"] = torch.zeros(1)
    detector = build_model("deformable_detr_pp_r50", 80)  # K = 0: the inference model
    state, report = from_official(detector, official)
    detector.load_state_dict(state, strict=True)
    assert report.mapped == 624 and len(report.dropped) == 53
    assert report.dropped["ema_backbone_conv1_weight"].startswith("an EMA copy")
    assert report.dropped["rpn_head.rpn_conv.weight"].startswith("training-only")
    assert "dropped 52 keys (training-only" in report.summary()


def test_class_count_change_reinitialises_only_the_classifiers(spec):
    model = build_model("co_deformable_detr_r50", 3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    state, report = from_official(model, _official_state(spec))
    model.load_state_dict(state, strict=True)
    assert sorted(report.reinitialised) == sorted(
        [f"detector.class_heads.{i}.{p}" for i in range(6) for p in ("weight", "bias")]
        + [f"detector.enc_class_head.{p}" for p in ("weight", "bias")]
        + [f"aux_heads.rcnn.{n}.{p}" for n in ("fc_cls", "fc_reg") for p in ("weight", "bias")]
        + [f"aux_heads.atss.atss_cls.{p}" for p in ("weight", "bias")])
    for k in report.reinitialised:
        assert torch.equal(state[k], fresh[k])


def test_foreign_or_damaged_state_dicts_are_named_errors(spec):
    model = build_model("co_deformable_detr_r50", 80)
    official = _official_state(spec)
    broken = {k: v for k, v in official.items() if k != "neck.convs.0.conv.weight"}
    broken["query_head.dn_generator.label_embedding.weight"] = torch.zeros(80, 256)
    broken["query_head.transformer.level_embeds"] = torch.zeros(5, 256)
    with pytest.raises(ValueError, match=r"missing: neck.convs.0.conv.weight; unexpected: "
                                         r"query_head.dn_generator.label_embedding.weight; shape mismatch: "
                                         r"query_head.transformer.level_embeds \(5, 256\) vs \(4, 256\)"):
        from_official(model, broken)
    with pytest.raises(ValueError, match="no counterpart in the official"):
        from_official(build_model("co_deformable_detr_r50", 80, aux_heads=("fcos",)), official)
    with pytest.raises(ValueError, match="needs a ResNet-50 backbone and the official options; this model has "
                                         "ResNet50, query_pos='dynamic'"):
        to_official(build_model("co_deformable_detr_r50", 80, query_pos="dynamic"), {})
    lite = build_model("co_deformable_detr_lite0", 80, **{"backbone.pretrained": False})
    with pytest.raises(ValueError, match="this model has EfficientNetLite0"):
        to_official(lite, lite.state_dict())


def test_converted_file_predicts_what_the_producing_model_predicts(shared_data, tmp_path):
    """Our K=2 R50 -> official layout -> ``codetr convert --from official --inference`` ->
    Predictor: the same detections on a real image as the model that produced the weights."""
    from codetr.cli import main
    from codetr.engine.predictor import Predictor

    torch.manual_seed(0)
    model = build_model("co_deformable_detr_r50", 80).eval()
    with torch.no_grad():  # off the structured init, so a mis-mapped tensor changes the output
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    torch.save({"state_dict": to_official(model, model.state_dict()), "meta": {}}, tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "ours.pt"), "--from", "official",
                 "--inference"]) == 0
    converted = Predictor.from_checkpoint(tmp_path / "ours.pt")
    assert converted.class_names[:3] == ["person", "bicycle", "car"] and len(converted.class_names) == 80
    image = shared_data / "bccd" / "images" / "BloodImage_00000.jpg"
    converted.transform = _small_eval_transform()
    reference = Predictor(model.inference_model(), converted.class_names, converted.transform)
    a, b = converted.predict(image), reference.predict(image)
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
    # and back: --to official reproduces the detector part of the official state dict
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    original = to_official(model, model.state_dict())
    assert len(back) == 624 and all(torch.equal(back[k], original[k]) for k in back)


def _small_eval_transform():
    """The eval transform at a short side of 320 (an R50 forward at 800 px takes ~5 s here)."""
    from codetr.config import DataConfig
    from codetr.engine.data import make_transforms

    return make_transforms(DataConfig(train_scales=(320,), max_size=512), train=False)


def test_convert_cli_errors_name_the_argument(tmp_path, capsys):
    from codetr.cli import main

    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.pt"), "--from", "official"]) == 2
    assert "--src: file not found" in capsys.readouterr().err
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    assert main(["convert", str(tmp_path / "foreign.pth"), str(tmp_path / "x.pt"), "--from", "official"]) == 2
    assert "not an official Co-Deformable-DETR" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_numpy_meta_loads_and_official_files_are_pointed_to_convert(spec, tmp_path):
    """mmdetection keeps numpy values in a checkpoint's meta; weights_only loading accepts
    them (data, no code) for conversion. Predictor names the command for an official file."""
    import numpy as np

    from codetr.convert import convert_file
    from codetr.engine.predictor import Predictor

    official = {"state_dict": _official_state(spec), "meta": {"epoch": np.int64(12), "best": np.float64(0.49),
                                                              "hist": np.arange(3), "CLASSES": ["a"] * 80}}
    torch.save(official, tmp_path / "official.pth")
    report = convert_file(tmp_path / "official.pth", tmp_path / "ours.pt", source="official", inference=True)
    assert report.mapped == 624
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["class_names"] == ["a"] * 80
    with pytest.raises(ValueError, match="official Co-DETR checkpoint: convert it first"):
        Predictor.from_checkpoint(tmp_path / "official.pth")
