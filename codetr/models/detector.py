"""The base-detector protocol that Co-DETR composes with, and what every family shares.

A base detector (one model file per family: ``deformable_detr.py``, ...) owns backbone,
neck, encoder, query selection, decoder, criterion and post-processing. Its ``forward`` is
the plain detector (training losses or detections). For Co-DETR it also exposes these
stages (``CoDETR`` in co_detr.py uses nothing else):

``encode(images, masks) -> Memory``
    Backbone, neck and encoder; the memory every query group attends to.
``detect(memory) -> outputs``
    The detector's own (one-to-one) queries through the decoder: {"pred_logits" [B, Q, C],
    "pred_boxes" [B, Q, 4] cxcywh normalised (last layer), "aux_outputs": earlier layers,
    optional "enc_outputs"}.
``loss(outputs, targets) -> dict``
    Its one-to-one criterion; targets as ``normalise_targets`` gives them.
``positive_query_embedding(num_heads, head_embed) -> nn.Module``
    A fresh module, one per auxiliary head (``head_embed``: "scalar" or "vector", for the
    families that add a head embedding), whose ``forward(boxes [B, M, 4] cxcywh
    normalised (constants), feats [B, M, C])`` returns ``(content, query_pos, reference)``:
    how this family turns a head's positive boxes into a query group.
``decode_group(content, query_pos, reference, memory) -> outputs``
    One extra query group through the shared decoder (no attention to other groups),
    per-layer outputs as ``detect``.
``group_loss(outputs, targets, num_boxes) -> dict``
    The criterion's per-layer losses with fixed indices: query i is supervised by
    target i (the head's assignment, no Hungarian matching).
``postprocess(outputs, orig_sizes) -> detections``, B dicts; ``detections(outputs,
orig_sizes)``, the same as stacked tensors (boxes [B, N, 4], scores [B, N], labels [B, N]:
the exported graph's outputs, codetr/export.py); ``num_decoder_layers``; ``criterion``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from codetr.box_ops import box_xyxy_to_cxcywh


@dataclass
class Memory:
    """The encoder output of a batch.

    memory [B, S, C]; padding_mask [B, S] (True on padding); shapes: L pairs of ints
    (H_l, W_l); spatial_shapes [L, 2] int64 and level_start_index [L], the same as tensors
    (``level_index``); valid_ratios [B, L, 2] (w, h fraction of each level
    that is not padding); values: optional per-decoder-layer cross-attention values
    [B, S, M, C / M], projected once when several query groups attend to this memory.
    """

    memory: torch.Tensor
    padding_mask: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    values: Optional[list[torch.Tensor]] = None

    def with_values(self, values: list[torch.Tensor]) -> "Memory":
        return replace(self, values=values)


def image_sizes(masks: torch.Tensor) -> torch.Tensor:
    """masks [B, H, W] (True on padding, at the bottom / right) -> [B, 2] (h, w) of the
    unpadded images."""
    return torch.stack(((~masks[:, :, 0]).sum(1), (~masks[:, 0, :]).sum(1)), -1)


def target_sizes(targets: list[dict], masks: torch.Tensor) -> torch.Tensor:
    """[B, 2] (h, w) of the unpadded images: the targets' "size" when given."""
    sizes = image_sizes(masks)
    return torch.stack([torch.as_tensor(t["size"], device=masks.device) if "size" in t else s
                        for t, s in zip(targets, sizes)]).long()


def normalise_targets(targets: list[dict], masks: torch.Tensor) -> list[dict]:
    """xyxy pixels -> cxcywh relative to the unpadded image (the decoder's frame)."""
    out = []
    for t, (h, w) in zip(targets, target_sizes(targets, masks).tolist()):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
        boxes = box_xyxy_to_cxcywh(t["boxes"].to(masks.device).float()) / scale
        out.append({"labels": t["labels"].to(masks.device), "boxes": boxes})
    return out


def output_sizes(masks: torch.Tensor, targets: Optional[list[dict]], orig_sizes) -> torch.Tensor:
    """[B, 2] (h, w) to scale detections to: ``orig_sizes`` when given, else the targets'
    "orig_size", else the unpadded image sizes."""
    if orig_sizes is not None:
        return torch.as_tensor(orig_sizes, device=masks.device)
    if targets is not None and all("orig_size" in t for t in targets):
        return torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(masks.device)
    return image_sizes(masks)
