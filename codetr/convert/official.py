"""The official Co-Deformable-DETR checkpoints (Sense-X/Co-DETR, mmdetection 2.x) <-> ours.

Official layout (projects/models/{co_detr,co_deformable_detr_head,transformer}.py and
projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py):
``backbone.*`` (mmdet ResNet, torchvision names), ``neck.{convs,extra_convs}.N.{conv,gn}``
(ChannelMapper of ConvModules), ``query_head.transformer.*`` (mmcv BaseTransformerLayer
names: ``attentions.N``, ``ffns.0.layers.*``, ``norms.N``), ``query_head.{cls,reg}_branches.N``
(N = num_decoder_layers is the two-stage encoder head), ``query_head.query_embedding``,
``query_head.downsample`` (the adapter's extra level), ``rpn_head.*``,
``roi_head.0.bbox_head.*`` and ``bbox_head.0.*`` (ATSS). The auxiliary heads' index i in
``aux_pos_trans.i`` / ``head_pos_embed.weight[i]`` follows the official order: the RoI heads
first, then the dense heads (R50: 0 = Faster R-CNN, 1 = ATSS), so groups are matched by
head name, never by position.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

#: Official source of each auxiliary head (the order of its positive-query index).
_OFFICIAL_HEAD_ORDER = ("rcnn", "atss")

# What a Co-DETR checkpoint holds besides the model (dropped, with the reason).
_DROP_PREFIXES = {"ema_": "an EMA copy of a weight (the checkpoint's model weights are used)"}
# Training-only keys of the official model, dropped when converting to a K=0 detector.
_TRAINING_ONLY = ("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample.",
                  "query_head.transformer.aux_pos_trans", "query_head.transformer.pos_feats_",
                  "query_head.transformer.head_pos_embed")
# Keys whose first dimension is the class count (re-initialised when it changes).
_CLASS_KEYS = re.compile(r"(.*class_heads\..*|.*enc_class_head\..*|.*\.fc_cls\..*|.*\.fc_reg\..*|.*atss_cls\..*)")


@dataclass
class ConversionReport:
    """What a conversion did: mapped keys count, dropped keys with reasons, re-initialised
    keys (class count changed)."""

    mapped: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    reinitialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"mapped {self.mapped} keys"]
        reasons: dict[str, list[str]] = {}
        for k, why in self.dropped.items():
            reasons.setdefault(why, []).append(k)
        for why, keys in reasons.items():
            lines.append(f"dropped {len(keys)} keys ({why}): {_head(keys)}")
        if self.reinitialised:
            lines.append(f"re-initialised {len(self.reinitialised)} keys (class count changed): "
                         f"{_head(self.reinitialised)}")
        return "\n".join(lines)


def _head(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def _rules(num_layers: int, head_index: dict[str, int]) -> list[tuple[str, Callable[[re.Match], str]]]:
    """(pattern on our key, official key from the match)."""
    qt, L = "query_head.transformer", num_layers
    enc = rf"detector\.encoder\.layers\.(\d+)\."
    dec = rf"detector\.decoder\.layers\.(\d+)\."
    mlp = lambda prefix: lambda m: f"{prefix}.{2 * int(m[m.lastindex - 1])}.{m[m.lastindex]}"  # noqa: E731
    pq = lambda part: lambda m: f"{qt}.{part}.{head_index[m[1]]}.{m[2]}"  # noqa: E731
    return [
        (r"detector\.backbone\.(.*)", lambda m: f"backbone.{m[1]}"),
        (r"detector\.neck\.(convs|extra_convs)\.(\d+)\.weight", lambda m: f"neck.{m[1]}.{m[2]}.conv.weight"),
        (r"detector\.neck\.norms\.(\d+)\.(.*)", lambda m: f"neck.convs.{m[1]}.gn.{m[2]}"),
        (r"detector\.neck\.extra_norms\.(\d+)\.(.*)", lambda m: f"neck.extra_convs.{m[1]}.gn.{m[2]}"),
        (r"detector\.level_embed", lambda m: f"{qt}.level_embeds"),
        (enc + r"self_attn\.(.*)", lambda m: f"{qt}.encoder.layers.{m[1]}.attentions.0.{m[2]}"),
        (enc + r"norm\.(.*)", lambda m: f"{qt}.encoder.layers.{m[1]}.norms.0.{m[2]}"),
        (enc + r"ffn\.linear1\.(.*)", lambda m: f"{qt}.encoder.layers.{m[1]}.ffns.0.layers.0.0.{m[2]}"),
        (enc + r"ffn\.linear2\.(.*)", lambda m: f"{qt}.encoder.layers.{m[1]}.ffns.0.layers.1.{m[2]}"),
        (enc + r"ffn\.norm\.(.*)", lambda m: f"{qt}.encoder.layers.{m[1]}.norms.1.{m[2]}"),
        (dec + r"self_attn\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.attentions.0.attn.{m[2]}"),
        (dec + r"norm1\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.norms.0.{m[2]}"),
        (dec + r"cross_attn\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.attentions.1.{m[2]}"),
        (dec + r"norm2\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.norms.1.{m[2]}"),
        (dec + r"ffn\.linear1\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.ffns.0.layers.0.0.{m[2]}"),
        (dec + r"ffn\.linear2\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.ffns.0.layers.1.{m[2]}"),
        (dec + r"ffn\.norm\.(.*)", lambda m: f"{qt}.decoder.layers.{m[1]}.norms.2.{m[2]}"),
        # The box MLPs are nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) there.
        (r"detector\.decoder\.bbox_heads\.(\d+)\.layers\.(\d)\.(.*)",
         lambda m: f"query_head.reg_branches.{m[1]}.{2 * int(m[2])}.{m[3]}"),
        (r"detector\.enc_bbox_head\.layers\.(\d)\.(.*)", mlp(f"query_head.reg_branches.{L}")),
        (r"detector\.class_heads\.(\d+)\.(.*)", lambda m: f"query_head.cls_branches.{m[1]}.{m[2]}"),
        (r"detector\.enc_class_head\.(.*)", lambda m: f"query_head.cls_branches.{L}.{m[1]}"),
        (r"detector\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(.*)", lambda m: f"{qt}.{m[1]}.{m[2]}"),
        (r"detector\.query_content\.weight", lambda m: "query_head.query_embedding.weight"),
        (r"adapter\.extra\.0\.([01])\.(.*)", lambda m: f"query_head.downsample.{m[1]}.{m[2]}"),
        (r"positive_queries\.(\w+)\.pos_trans\.(.*)", pq("aux_pos_trans")),
        (r"positive_queries\.(\w+)\.pos_norm\.(.*)", pq("aux_pos_trans_norm")),
        (r"positive_queries\.(\w+)\.feat_trans\.(.*)", pq("pos_feats_trans")),
        (r"positive_queries\.(\w+)\.feat_norm\.(.*)", pq("pos_feats_norm")),
        (r"aux_heads\.rcnn\.(rpn_conv|rpn_cls|rpn_reg)\.(.*)", lambda m: f"rpn_head.{m[1]}.{m[2]}"),
        (r"aux_heads\.rcnn\.(shared_fcs\.\d+|fc_cls|fc_reg)\.(.*)", lambda m: f"roi_head.0.bbox_head.{m[1]}.{m[2]}"),
        # Our towers are flat (conv, GN, ReLU) x n; theirs are ConvModules {conv, gn}.
        (r"aux_heads\.atss\.(cls_convs|reg_convs)\.(\d+)\.(weight|bias)",
         lambda m: f"bbox_head.0.{m[1]}.{int(m[2]) // 3}.{('conv', 'gn')[int(m[2]) % 3]}.{m[3]}"),
        (r"aux_heads\.atss\.(atss_cls|atss_reg|atss_centerness|scales\.\d+)\.(.*)",
         lambda m: f"bbox_head.0.{m[1]}.{m[2]}"),
    ]


_HEAD_EMBED = re.compile(r"positive_queries\.(\w+)\.head_embed")
_OFFICIAL_HEAD_EMBED = "query_head.transformer.head_pos_embed.weight"


def key_map(model: nn.Module) -> tuple[dict[str, str], dict[str, int]]:
    """(our key -> official key for every state-dict key of a CoDETR ``model`` except the
    head embeddings, our head name -> official head index). ValueError names a key or head
    the official model does not have."""
    det = model.detector
    variants = [name for name, official in (("query_pos", "static"), ("encoder_head", "official"),
                                            ("mixed_selection", True)) if getattr(det, name) != official]
    if variants or type(det.backbone).__name__ != "ResNet50":
        raise ValueError(f"the official Co-Deformable-DETR R50 layout needs a ResNet-50 backbone and the "
                         f"official options; this model has {type(det.backbone).__name__}"
                         + "".join(f", {v}={getattr(det, v)!r}" for v in variants))
    heads = list(model.aux_heads)
    unknown = [h for h in heads if h not in _OFFICIAL_HEAD_ORDER]
    if unknown:
        raise ValueError(f"aux heads {unknown} have no counterpart in the official Co-Deformable-DETR "
                         f"(it has {list(_OFFICIAL_HEAD_ORDER)})")
    if model.adapter is not None and len(getattr(model.adapter, "extra", ())) != 1:
        raise ValueError("the official adapter is the encoder levels plus one extra level (query_head.downsample)")
    head_index = {h: i for i, h in enumerate(h for h in _OFFICIAL_HEAD_ORDER if h in heads)}
    rules = [(re.compile(p), f) for p, f in _rules(det.num_decoder_layers, head_index)]
    out = {}
    for key in model.state_dict():
        if _HEAD_EMBED.fullmatch(key):
            continue
        for pattern, fn in rules:
            m = pattern.fullmatch(key)
            if m:
                out[key] = fn(m)
                break
        else:
            raise ValueError(f"{key} has no counterpart in the official Co-Deformable-DETR "
                             "(a variant option, e.g. query_pos='dynamic'?)")
    return out, head_index


def to_official(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CoDETR state dict (of ``model``'s architecture) -> the official state dict."""
    names, head_index = key_map(model)
    out = {names[k]: v for k, v in state.items() if k in names}
    if head_index:
        rows = sorted(head_index, key=head_index.get)
        out[_OFFICIAL_HEAD_EMBED] = torch.stack([state[f"positive_queries.{h}.head_embed"] for h in rows])
    return out


def from_official(model: nn.Module, official: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                             ConversionReport]:
    """The official state dict (or checkpoint with "state_dict") -> a state dict of
    ``model`` (a CoDETR of the same architecture; K = 0 takes the query head only and drops
    the auxiliary branches). Shapes are checked; class-count-dependent keys whose first
    dimension differs keep ``model``'s initialisation (fine-tuning on other classes).

    Raises ValueError naming the first missing, unexpected and mis-shaped keys."""
    if isinstance(official.get("state_dict"), dict):
        official = official["state_dict"]
    report = ConversionReport()
    src = {}
    for k, v in official.items():
        why = next((r for p, r in _DROP_PREFIXES.items() if k.startswith(p)), None)
        if why is None and not model.aux_heads and k.startswith(_TRAINING_ONLY):
            why = "training-only auxiliary branch, not part of the inference model"
        if why:
            report.dropped[k] = why
        else:
            src[k] = v
    names, head_index = key_map(model)
    own = model.state_dict()
    wanted = set(names.values()) | ({_OFFICIAL_HEAD_EMBED} if head_index else set())
    missing = sorted(wanted - set(src))
    unexpected = sorted(set(src) - wanted)
    out, bad_shapes = {}, []
    for ours, theirs in names.items():
        if theirs not in src:
            continue
        v = src[theirs]
        if v.shape != own[ours].shape:
            if _CLASS_KEYS.fullmatch(ours) and v.shape[1:] == own[ours].shape[1:]:
                out[ours] = own[ours]
                report.reinitialised.append(ours)
                continue
            bad_shapes.append(f"{theirs} {tuple(v.shape)} vs {tuple(own[ours].shape)}")
            continue
        out[ours] = v.to(own[ours].dtype)
    if head_index and _OFFICIAL_HEAD_EMBED in src:
        table = src[_OFFICIAL_HEAD_EMBED]
        for h, i in head_index.items():
            key = f"positive_queries.{h}.head_embed"
            if table.shape != (len(head_index), own[key].numel()):
                bad_shapes.append(f"{_OFFICIAL_HEAD_EMBED} {tuple(table.shape)} vs "
                                  f"({len(head_index)}, {own[key].numel()})")
                break
            out[key] = table[i].to(own[key].dtype)
    if missing or unexpected or bad_shapes:
        parts = [f"{what}: {_head(keys)}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shapes)) if keys]
        raise ValueError("the checkpoint is not an official Co-Deformable-DETR of this architecture; "
                         + "; ".join(parts))
    report.mapped = len(out) - len(report.reinitialised)
    return out, report
