"""Deformable-DETR++: two-stage Deformable DETR with iterative box refinement, mixed query
selection and look-forward-twice: the query head of the official Co-Deformable-DETR
(Sense-X/Co-DETR ``CoDeformDETRHead`` + ``CoDeformableDetrTransformer``), and so Co-DETR's
K=0 baseline. It implements the base-detector protocol of ``detector.py``.

Our variants, each off in the official presets (``config.py``):
  query_pos="dynamic"       the decoder recomputes the query position every layer from the
                            current box (DINO / DAB) instead of keeping the one computed
                            from the selected proposals;
  encoder_head="agnostic"   a 1-way objectness head whose loss covers only the selected
                            proposals (DINO), padded / border tokens never selected;
  batch_invariant=True      backbone features zeroed and neck GroupNorm statistics taken on
                            unpadded positions only, so predictions do not depend on how
                            much padding the batch partners force on an image.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.losses.criterion import SetCriterion

from .backbones import mask_to
from .detector import Memory, normalise_targets, output_sizes
from .ms_deform_attn import MSDeformAttn, level_index
from .position_encoding import PositionEmbeddingSine, coord_sine_embed
from .transformer import MLP, DeformableDecoder, DeformableEncoder, inverse_sigmoid


class PositiveQueryEmbedding(nn.Module):
    """How Co-Deformable-DETR turns one auxiliary head's positive boxes into queries (the
    official ``forward_aux``): PE(box) (512-d sine embedding of cx, cy, w, h) -> Linear +
    LayerNorm -> split into position and content; content += LayerNorm(Linear(feature));
    position += the head's embedding; the box itself is the first layer's reference.

    Args:
        d_model: C.
        num_heads: K, the number of auxiliary heads (only the init depends on it).
        head_embed: "scalar", the official: one learned number per head. The official
            ``nn.Embedding(K, 1, 1, C)`` is a [K, 1] table (a bug its authors keep for the
            R50 numbers), Xavier-initialised with the rest of the transformer, so each head
            adds U(+-sqrt(6 / (1 + K))) to every channel. "vector": a C-vector per head,
            Xavier over [K, C] (what the authors meant).
    """

    def __init__(self, d_model: int, num_heads: int, head_embed: Literal["scalar", "vector"] = "scalar"):
        super().__init__()
        if head_embed not in ("scalar", "vector"):
            raise ValueError(f"head_embed: expected 'scalar' or 'vector', got {head_embed!r}")
        self.d_model = d_model
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_norm = nn.LayerNorm(2 * d_model)
        self.feat_trans = nn.Linear(d_model, d_model)
        self.feat_norm = nn.LayerNorm(d_model)
        width = 1 if head_embed == "scalar" else d_model
        self.head_embed = nn.Parameter(torch.empty(width))
        for linear in (self.pos_trans, self.feat_trans):
            nn.init.xavier_uniform_(linear.weight)
        bound = math.sqrt(6.0 / (width + num_heads))  # xavier_uniform_ of the official [K, width] table
        nn.init.uniform_(self.head_embed, -bound, bound)

    def forward(self, boxes: torch.Tensor, feats: torch.Tensor):
        """boxes [B, M, 4] cxcywh normalised by the unpadded image, not clipped (constants);
        feats [B, M, C] -> (content [B, M, C], query_pos [B, M, C], reference [B, M, 4])."""
        # The official embeds sigmoid(inverse_sigmoid(box)): w, h > 1 (anchors crossing
        # the border) are clamped for the embedding only; the reference keeps them.
        emb = self.pos_norm(self.pos_trans(coord_sine_embed(inverse_sigmoid(boxes).sigmoid(), self.d_model // 2)))
        position, content = emb.split(self.d_model, -1)
        content = content + self.feat_norm(self.feat_trans(feats))
        return content, position + self.head_embed, boxes


class DeformableDETRPP(nn.Module):
    """Args:
        backbone: module with ``forward(images, mask) -> list of maps`` and ``out_channels``.
        neck: ``forward(maps, mask) -> list of num_levels maps [B, d_model, H_l, W_l]``.
        encoder: DeformableEncoder; decoder: DeformableDecoder (same d_model and levels;
            ``dynamic_query_pos`` must match ``query_pos``).
        num_classes: C.
        num_queries: queries selected from the encoder proposals (300 in the paper).
        criterion: SetCriterion, needed for training only.
        num_levels: feature levels fed to the transformer.
        proposal_size: side of level-0 proposal boxes (x2 per level), relative to the image.
        num_detections: detections kept per image at evaluation.
        query_pos: "static" (official) or "dynamic" (see the module docstring).
        mixed_selection: content queries are learned embeddings (True, official
            Co-Deformable-DETR) or, as in two-stage Deformable-DETR, the second half of the
            proposals' position transform (False; static query_pos only).
        encoder_head: "official" or "agnostic" (see the module docstring).
        batch_invariant: see the module docstring (False in the official presets).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, encoder: DeformableEncoder,
                 decoder: DeformableDecoder, num_classes: int, num_queries: int = 300,
                 criterion: Optional[SetCriterion] = None, num_levels: int = 4, proposal_size: float = 0.05,
                 num_detections: int = 100, query_pos: Literal["static", "dynamic"] = "static",
                 mixed_selection: bool = True, encoder_head: Literal["official", "agnostic"] = "official",
                 batch_invariant: bool = False):
        super().__init__()
        if query_pos not in ("static", "dynamic"):
            raise ValueError(f"query_pos: expected 'static' or 'dynamic', got {query_pos!r}")
        if (decoder.ref_point_head is not None) != (query_pos == "dynamic"):
            raise ValueError(f"query_pos={query_pos!r} needs a decoder built with "
                             f"dynamic_query_pos={query_pos == 'dynamic'}")
        if encoder_head not in ("official", "agnostic"):
            raise ValueError(f"encoder_head: expected 'official' or 'agnostic', got {encoder_head!r}")
        if not mixed_selection and query_pos == "dynamic":
            raise ValueError("mixed_selection=False takes the content from the static query position")
        d = decoder.d_model
        self.backbone, self.neck, self.encoder, self.decoder = backbone, neck, encoder, decoder
        self.criterion = criterion
        self.num_classes, self.num_queries, self.num_levels = num_classes, num_queries, num_levels
        self.proposal_size, self.num_detections = proposal_size, num_detections
        self.query_pos, self.mixed_selection = query_pos, mixed_selection
        self.encoder_head, self.batch_invariant = encoder_head, batch_invariant
        self.position_embedding = PositionEmbeddingSine(d // 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d))
        # Two-stage head on the encoder memory: every token proposes one box. The official
        # classifies each proposal over all classes and ranks by class 0 (its loss gives
        # every target label 0); ours is one objectness logit.
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class_head = nn.Linear(d, num_classes if encoder_head == "official" else 1)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        if query_pos == "static":
            # query_pos = first half of LN(Linear(sine(top-k proposals))), kept for all layers.
            self.pos_trans = nn.Linear(2 * d, 2 * d)
            self.pos_trans_norm = nn.LayerNorm(2 * d)
        # Mixed query selection: learned content queries, positions from the top proposals.
        self.query_content = nn.Embedding(num_queries, d) if mixed_selection else None
        self.class_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(len(decoder.layers)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: Xavier-uniform on every matrix of the transformer (encoder,
        decoder layers, enc_output, pos_trans, ref_point_head), then Deformable DETR's MSDA
        init, N(0, 1) level embeddings; class biases at prior 0.01, box heads' last layer 0
        (identity refinement); the rest keeps PyTorch's defaults, as the official head."""
        transformer = [self.encoder, self.decoder.layers, self.enc_output]
        transformer += [self.pos_trans] if self.query_pos == "static" else [self.decoder.ref_point_head]
        for module in transformer:
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        bias = -math.log((1 - 0.01) / 0.01)  # prior probability 0.01 for focal loss (RetinaNet)
        for head in [self.enc_class_head, *self.class_heads]:
            nn.init.constant_(head.bias, bias)
        for mlp in [self.enc_bbox_head, *self.decoder.bbox_heads]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.layers)

    # ------------------------------------------------------------------ stages

    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> Memory:
        """images [B, 3, H, W], masks [B, H, W] (True on padding) -> Memory."""
        inner = masks if self.batch_invariant else None
        feats = self.neck(self.backbone(images, inner), inner)
        srcs, poss, pads, shapes = [], [], [], []
        for lvl, f in enumerate(feats):
            m = mask_to(masks, f)
            poss.append((self.position_embedding(m).to(f.dtype) + self.level_embed[lvl][None, :, None, None])
                        .flatten(2).transpose(1, 2))
            srcs.append(f.flatten(2).transpose(1, 2))
            pads.append(m.flatten(1))
            shapes.append((f.shape[-2], f.shape[-1]))
        valid_ratios = torch.stack([self._valid_ratio(mask_to(masks, f)) for f in feats], 1)
        src, pos, pad = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(pads, 1)
        spatial_shapes, level_start_index = level_index(shapes, images.device)
        memory = self.encoder(src, pos, shapes, spatial_shapes, level_start_index, valid_ratios, pad)
        return Memory(memory, pad, tuple(shapes), spatial_shapes, level_start_index, valid_ratios)

    @staticmethod
    def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        H, W = mask.shape[-2:]
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack((valid_w / W, valid_h / H), -1)

    def proposals(self, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """One anchor box per encoder token: its pixel centre and side proposal_size * 2^level,
        in inverse-sigmoid space, normalised to the unpadded image.

        Returns (proposals [B, S, 4], invalid [B, S] bool). Padded tokens and anchors reaching
        the image border (any coordinate outside (0.01, 0.99)) are invalid: their proposals
        are +inf and their memory is zeroed before the two-stage head."""
        vr = memory.valid_ratios
        out = []
        for lvl, (H, W) in enumerate(memory.shapes):
            ys, xs = torch.meshgrid(torch.arange(H, device=vr.device, dtype=torch.float32) + 0.5,
                                    torch.arange(W, device=vr.device, dtype=torch.float32) + 0.5, indexing="ij")
            cx = xs.reshape(1, -1) / (vr[:, lvl, 0:1] * W)
            cy = ys.reshape(1, -1) / (vr[:, lvl, 1:2] * H)
            wh = torch.full_like(cx, self.proposal_size * 2.0 ** lvl)
            out.append(torch.stack((cx, cy, wh, wh), -1))
        p = torch.cat(out, 1)
        invalid = memory.padding_mask | ~((p > 0.01) & (p < 0.99)).all(-1)
        p = torch.log(p / (1 - p)).masked_fill(invalid[..., None], float("inf"))
        return p, invalid

    def select_queries(self, memory: Memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Two-stage query selection.

        Returns:
            content: [B, K, C] content queries (K = min(num_queries, S)).
            query_pos: [B, K, C] their positions (static query_pos), else None.
            reference_boxes: [B, K, 4] the top-K encoder boxes (cx, cy, w, h), detached.
            enc_outputs: {"pred_logits", "pred_boxes"} for the encoder loss, undetached:
                every token's [B, S, C] and [B, S, 4] (official), or the selected ones'
                [B, K, 1] and [B, K, 4] (agnostic).
        """
        mem = memory.memory
        proposals, invalid = self.proposals(memory)
        out_memory = self.enc_output_norm(self.enc_output(mem.masked_fill(invalid[..., None], 0.0)))
        logits = self.enc_class_head(out_memory)  # [B, S, C or 1]
        boxes_unact = self.enc_bbox_head(out_memory) + proposals
        K = min(self.num_queries, mem.shape[1])
        scores = logits[..., 0]
        if self.encoder_head == "agnostic":
            scores = scores.masked_fill(invalid, float("-inf"))
        # The official ranks every token, invalid ones included (a constant score: their
        # memory is zeroed); an invalid token picked starts from the box (1, 1, 1, 1).
        topk = scores.topk(K, dim=1).indices  # [B, K]
        ref = boxes_unact.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()
        if self.encoder_head == "official":
            enc_outputs = {"pred_logits": logits, "pred_boxes": boxes_unact.sigmoid()}
        else:
            enc_outputs = {"pred_logits": logits.gather(1, topk[..., None]), "pred_boxes": ref}
        ref = ref.detach()
        query_pos = None
        if self.query_pos == "static":
            pos_content = self.pos_trans_norm(self.pos_trans(coord_sine_embed(ref, mem.shape[-1] // 2)))
            query_pos, content = pos_content.split(mem.shape[-1], -1)
        if self.mixed_selection:
            content = self.query_content.weight[None, :K].expand(mem.shape[0], -1, -1)
        return content, query_pos, ref, enc_outputs

    def decode_group(self, content: torch.Tensor, query_pos: Optional[torch.Tensor], reference: torch.Tensor,
                     memory: Memory, self_attn_mask: Optional[torch.Tensor] = None) -> dict:
        """content, query_pos [B, Q, C], reference [B, Q, 4] -> {"pred_logits" [B, Q, C_cls],
        "pred_boxes" [B, Q, 4] (last layer), "aux_outputs": list of such dicts for the
        earlier layers}."""
        hidden, boxes = self.decoder(content, query_pos, reference, memory, self_attn_mask)
        layers = [{"pred_logits": head(h), "pred_boxes": b} for head, h, b in zip(self.class_heads, hidden, boxes)]
        return {**layers[-1], "aux_outputs": layers[:-1]}

    def detect(self, memory: Memory) -> dict:
        """The one-to-one queries: selection, decoder; outputs with "enc_outputs"."""
        content, query_pos, ref, enc_outputs = self.select_queries(memory)
        return {**self.decode_group(content, query_pos, ref, memory), "enc_outputs": enc_outputs}

    def positive_query_embedding(self, num_heads: int, head_embed: Literal["scalar", "vector"] = "scalar"):
        return PositiveQueryEmbedding(self.decoder.d_model, num_heads, head_embed)

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        if self.criterion is None:
            raise ValueError("training needs a criterion")
        return self.criterion(outputs, targets)

    def group_loss(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        indices = [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]
        return self.criterion.decoder_layers(outputs, targets, num_boxes, indices)

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
        outputs = self.detect(self.encode(images, masks))
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            return self.loss(outputs, normalise_targets(targets, masks))
        return self.postprocess(outputs, output_sizes(masks, targets, orig_sizes))

    @torch.no_grad()
    def postprocess(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict]:
        """Sigmoid scores, top-N over queries x classes (a query may give several labels), no
        NMS; boxes clamped to the image (as the official) and scaled to orig_sizes [B, 2]
        (h, w). B dicts of ``detections``' rows."""
        boxes, scores, labels = self.detections(outputs, orig_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]

    def detections(self, outputs: dict, orig_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``postprocess`` on stacked tensors (the exported graph's outputs): boxes [B, N, 4]
        xyxy pixels, scores [B, N] best first, labels [B, N] int64."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        B, Q, C = logits.shape
        scores, idx = logits.sigmoid().flatten(1).topk(min(self.num_detections, Q * C), dim=1)
        qidx, labels = idx // C, idx % C
        xyxy = box_cxcywh_to_xyxy(boxes).gather(1, qidx[..., None].expand(-1, -1, 4)).clamp(0, 1)
        h, w = orig_sizes.float().unbind(-1)
        return xyxy * torch.stack((w, h, w, h), -1)[:, None], scores, labels
