"""Deformable-DETR++: two-stage Deformable DETR with iterative box refinement, mixed query
selection and look-forward-twice (the K=0 baseline of Co-DETR)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from codetr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from codetr.losses.criterion import SetCriterion

from .backbones import mask_to
from .position_encoding import PositionEmbeddingSine
from .transformer import MLP, DeformableDecoder, DeformableEncoder


class DeformableDETRPP(nn.Module):
    """Args:
        backbone: module with ``forward(images, mask) -> list of maps`` and ``out_channels``.
        neck: ``forward(maps, mask) -> list of num_levels maps [B, d_model, H_l, W_l]``.
        encoder: DeformableEncoder; decoder: DeformableDecoder (same d_model and levels).
        num_classes: C.
        num_queries: queries selected from the encoder proposals (300 in the paper).
        criterion: SetCriterion, needed for training only.
        num_levels: feature levels fed to the transformer.
        proposal_size: side of level-0 proposal boxes (x2 per level), relative to the image.
        num_detections: detections kept per image at evaluation.

    Use ``forward``; ``encode`` / ``select_queries`` / ``decode`` are the stages, public so
    Co-DETR can run extra query groups through the same encoder memory and decoder.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, encoder: DeformableEncoder,
                 decoder: DeformableDecoder, num_classes: int, num_queries: int = 300,
                 criterion: Optional[SetCriterion] = None, num_levels: int = 4, proposal_size: float = 0.05,
                 num_detections: int = 100):
        super().__init__()
        d = decoder.d_model
        self.backbone, self.neck, self.encoder, self.decoder = backbone, neck, encoder, decoder
        self.criterion = criterion
        self.num_classes, self.num_queries, self.num_levels = num_classes, num_queries, num_levels
        self.proposal_size, self.num_detections = proposal_size, num_detections
        self.position_embedding = PositionEmbeddingSine(d // 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d).normal_())
        # Two-stage head on the encoder memory: every token proposes one box.
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class_head = nn.Linear(d, 1)  # class-agnostic objectness (targets all label 0)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        # Mixed query selection: learned content queries, positions from the top proposals.
        self.query_content = nn.Embedding(num_queries, d)
        self.class_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(len(decoder.layers)))
        bias = -math.log((1 - 0.01) / 0.01)  # prior probability 0.01 for focal loss (RetinaNet)
        for head in [self.enc_class_head, *self.class_heads]:
            nn.init.constant_(head.bias, bias)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].bias)

    # ------------------------------------------------------------------ stages

    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> dict:
        """images [B, 3, H, W], masks [B, H, W] (True on padding) ->
        {"memory" [B, S, C], "padding_mask" [B, S], "spatial_shapes" [L, 2] int64 (H_l, W_l),
         "level_start_index" [L], "valid_ratios" [B, L, 2] (w, h)}."""
        feats = self.neck(self.backbone(images, masks), masks)
        srcs, poss, pads, shapes = [], [], [], []
        for lvl, f in enumerate(feats):
            m = mask_to(masks, f)
            poss.append((self.position_embedding(m).to(f.dtype) + self.level_embed[lvl][None, :, None, None])
                        .flatten(2).transpose(1, 2))
            srcs.append(f.flatten(2).transpose(1, 2))
            pads.append(m.flatten(1))
            shapes.append(f.shape[-2:])
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.int64, device=images.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self._valid_ratio(mask_to(masks, f)) for f in feats], 1)
        src, pos, pad = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(pads, 1)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, pad)
        return {"memory": memory, "padding_mask": pad, "spatial_shapes": spatial_shapes,
                "level_start_index": level_start_index, "valid_ratios": valid_ratios}

    @staticmethod
    def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        H, W = mask.shape[-2:]
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack((valid_w / W, valid_h / H), -1)

    def proposals(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One anchor box per encoder token: its pixel centre and side proposal_size * 2^level,
        in inverse-sigmoid space, normalised to the unpadded image.

        Returns (proposals [B, S, 4], invalid [B, S] bool). Padded tokens and anchors reaching
        the image border (any coordinate outside (0.01, 0.99)) are invalid: their proposals
        are +inf and the selection never picks them."""
        memory_pad, vr = enc["padding_mask"], enc["valid_ratios"]
        out = []
        for lvl, (H, W) in enumerate(enc["spatial_shapes"].tolist()):
            ys, xs = torch.meshgrid(torch.arange(H, device=vr.device, dtype=torch.float32) + 0.5,
                                    torch.arange(W, device=vr.device, dtype=torch.float32) + 0.5, indexing="ij")
            cx = xs.reshape(1, -1) / (vr[:, lvl, 0:1] * W)
            cy = ys.reshape(1, -1) / (vr[:, lvl, 1:2] * H)
            wh = torch.full_like(cx, self.proposal_size * 2.0 ** lvl)
            out.append(torch.stack((cx, cy, wh, wh), -1))
        p = torch.cat(out, 1)
        invalid = memory_pad | ~((p > 0.01) & (p < 0.99)).all(-1)
        p = torch.log(p / (1 - p)).masked_fill(invalid[..., None], float("inf"))
        return p, invalid

    def select_queries(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Two-stage query selection.

        Returns:
            query: [B, K, C] learned content queries (K = min(num_queries, S)).
            reference_boxes: [B, K, 4] the top-K encoder boxes (cx, cy, w, h), detached.
            enc_outputs: {"pred_logits" [B, K, 1], "pred_boxes" [B, K, 4]} of the selected
                proposals, undetached, for the class-agnostic encoder loss.
        """
        memory = enc["memory"]
        proposals, invalid = self.proposals(enc)
        out_memory = memory.masked_fill(invalid[..., None], 0.0)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        logits = self.enc_class_head(out_memory)  # [B, S, 1]
        boxes_unact = self.enc_bbox_head(out_memory) + proposals
        K = min(self.num_queries, memory.shape[1])
        scores = logits[..., 0].masked_fill(invalid, float("-inf"))
        topk = scores.topk(K, dim=1).indices  # [B, K]
        sel_logits = logits.gather(1, topk[..., None])
        sel_boxes = boxes_unact.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()
        query = self.query_content.weight[None, :K].expand(memory.shape[0], -1, -1)
        return query, sel_boxes.detach(), {"pred_logits": sel_logits, "pred_boxes": sel_boxes}

    def decode(self, query: torch.Tensor, reference_boxes: torch.Tensor, enc: dict,
               self_attn_mask: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None) -> dict:
        """Run the decoder and the per-layer class heads.

        query [B, Q, C], reference_boxes [B, Q, 4] -> {"pred_logits" [B, Q, C_cls],
        "pred_boxes" [B, Q, 4] (last layer), "aux_outputs": list of such dicts for the
        earlier layers}."""
        hidden, boxes = self.decoder(query, reference_boxes, enc["memory"], enc["spatial_shapes"],
                                     enc["level_start_index"], enc["valid_ratios"], enc["padding_mask"],
                                     self_attn_mask, query_pos, enc.get("memory_values"))
        layers = [{"pred_logits": head(h), "pred_boxes": b} for head, h, b in zip(self.class_heads, hidden, boxes)]
        return {**layers[-1], "aux_outputs": layers[:-1]}

    # ------------------------------------------------------------------ forward

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: Optional[list[dict]] = None,
                orig_sizes: Optional[torch.Tensor] = None):
        """
        Args:
            images: [B, 3, H, W] normalised, zero-padded (``codetr.data.collate``).
            masks: [B, H, W] bool, True on padding.
            targets: B dicts with "boxes" [G, 4] xyxy absolute pixels of the (transformed)
                image and "labels" [G] int64; optional "size" (h, w) of the unpadded image and
                "orig_size" (h, w) of the original image. Required in training.
            orig_sizes: [B, 2] (h, w) to scale eval boxes to; default the targets'
                "orig_size", else the unpadded image size.
        Returns:
            training: dict of weighted losses (see SetCriterion; the sum is the loss).
            eval: B dicts {"boxes" [N, 4] xyxy in original image pixels, "scores" [N],
                "labels" [N] int64}, N = min(num_detections, Q * C), best first.
        """
        enc = self.encode(images, masks)
        query, ref, enc_outputs = self.select_queries(enc)
        outputs = self.decode(query, ref, enc)
        outputs["enc_outputs"] = enc_outputs
        if self.training:
            if targets is None or self.criterion is None:
                raise ValueError("training needs targets and a criterion")
            return self.criterion(outputs, self.normalise_targets(targets, masks))
        return self.postprocess(outputs, self._orig_sizes(masks, targets, orig_sizes))

    @staticmethod
    def _image_sizes(masks: torch.Tensor) -> torch.Tensor:
        """[B, 2] (h, w) of the unpadded images."""
        return torch.stack(((~masks[:, :, 0]).sum(1), (~masks[:, 0, :]).sum(1)), -1)

    def _target_sizes(self, targets: list[dict], masks: torch.Tensor) -> torch.Tensor:
        """[B, 2] (h, w) of the unpadded images (the targets' "size" when given)."""
        sizes = self._image_sizes(masks)
        return torch.stack([torch.as_tensor(t["size"], device=masks.device) if "size" in t else s
                            for t, s in zip(targets, sizes)]).long()

    def normalise_targets(self, targets: list[dict], masks: torch.Tensor) -> list[dict]:
        """xyxy pixels -> cxcywh relative to the unpadded image (the decoder's frame)."""
        out = []
        for t, (h, w) in zip(targets, self._target_sizes(targets, masks).tolist()):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
            boxes = box_xyxy_to_cxcywh(t["boxes"].to(masks.device).float()) / scale
            out.append({"labels": t["labels"].to(masks.device), "boxes": boxes})
        return out

    def _orig_sizes(self, masks, targets, orig_sizes) -> torch.Tensor:
        if orig_sizes is not None:
            return torch.as_tensor(orig_sizes, device=masks.device)
        if targets is not None and all("orig_size" in t for t in targets):
            return torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(masks.device)
        return self._image_sizes(masks)

    @torch.no_grad()
    def postprocess(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict]:
        """Sigmoid scores, top-N over queries x classes (a query may give several labels), no
        NMS; boxes scaled to orig_sizes [B, 2] (h, w)."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        B, Q, C = logits.shape
        prob = logits.sigmoid().flatten(1)
        scores, idx = prob.topk(min(self.num_detections, Q * C), dim=1)
        qidx, labels = idx // C, idx % C
        xyxy = box_cxcywh_to_xyxy(boxes).gather(1, qidx[..., None].expand(-1, -1, 4))
        h, w = orig_sizes.float().unbind(-1)
        xyxy = xyxy * torch.stack((w, h, w, h), -1)[:, None]
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(xyxy, scores, labels)]
