"""Checkpoint converters: other implementations' state dicts to ours and back.

``official``: the Sense-X/Co-DETR Co-Deformable-DETR checkpoints (mmdetection 2.x layout).
Every key is mapped by name (never by position) or reported as dropped with its reason.
``convert_file`` is what ``codetr convert`` runs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from .official import ConversionReport, from_official, to_official

__all__ = ["ConversionReport", "convert_file", "from_official", "to_official", "COCO_CLASSES"]

#: The 80 COCO class names in category-id order (the official checkpoints' label order).
COCO_CLASSES = tuple(name.replace("_", " ") for name in (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split())


def convert_file(src: Union[str, Path], dst: Union[str, Path], source: Optional[str] = None,
                 target: Optional[str] = None, preset: Optional[str] = None, inference: bool = False,
                 num_classes: Optional[int] = None, class_names: Optional[list[str]] = None) -> ConversionReport:
    """``source="official"``: an official Co-Deformable-DETR checkpoint -> a codetr
    checkpoint (``Predictor.from_checkpoint``, ``codetr eval``, ``codetr train --pretrained``
    read it) of ``preset`` (default co_deformable_detr_r50, or its K=0 detector with
    ``inference``). The class count is the checkpoint's unless ``num_classes`` changes it
    (classifiers re-initialised); names: ``class_names``, else the checkpoint's meta
    CLASSES, else COCO's for 80 classes.
    ``target="official"``: a codetr checkpoint -> the official layout ({"state_dict",
    "meta": {"CLASSES"}}). Files are written atomically."""
    from codetr.config import build_model, config_from_dict, get_preset
    from codetr.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint

    if (source is None) == (target is None):
        raise ValueError("give exactly one of source ('official') and target ('official')")
    if (source or target) != "official":
        raise ValueError(f"unknown checkpoint format {source or target!r}; supported: 'official'")
    ckpt = load_checkpoint(src)
    if target == "official":
        if not {"model", "model_config", "class_names"} <= set(ckpt):
            raise ValueError(f"{src} is not a codetr checkpoint (no model / model_config / class_names)")
        cfg = config_from_dict(ckpt["model_config"])
        cfg.backbone.pretrained = False
        names = list(ckpt["class_names"])
        model = build_model(cfg, len(names))
        load_model_state(model, ckpt["model"], source=str(src))
        state = to_official(model, model.state_dict())
        save_checkpoint({"state_dict": state, "meta": {"CLASSES": tuple(names), "converted_by": "codetr"}}, dst)
        return ConversionReport(mapped=len(state))
    official = ckpt.get("state_dict", ckpt)
    if "query_head.cls_branches.0.weight" not in official:
        raise ValueError(f"{src}: no query_head.cls_branches.0.weight: not an official Co-Deformable-DETR checkpoint")
    theirs = int(official["query_head.cls_branches.0.weight"].shape[0])
    C = num_classes or theirs
    if class_names is None:
        meta = ckpt.get("meta") or {}
        meta_names = list(meta.get("CLASSES") or []) if isinstance(meta, dict) else []
        if C == theirs and len(meta_names) == C:
            class_names = meta_names
        elif C == len(COCO_CLASSES) and C == theirs:
            class_names = list(COCO_CLASSES)
        else:
            class_names = [f"class_{i}" for i in range(C)]
    if len(class_names) != C:
        raise ValueError(f"class_names: {len(class_names)} names for {C} classes")
    preset = preset or ("deformable_detr_pp_r50" if inference else "co_deformable_detr_r50")
    cfg = get_preset(preset)
    cfg.backbone.pretrained = False
    model = build_model(cfg, C, **({"aux_heads": ()} if inference else {}))
    state, report = from_official(model, official)
    model.load_state_dict(state, strict=True)
    save_checkpoint({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "class_names": class_names,
                     "converted_from": json.dumps({"file": str(src), "format": "official", "mapped": report.mapped,
                                                   "dropped": len(report.dropped),
                                                   "reinitialised": report.reinitialised})}, dst)
    return report
