"""Co-DETR: Deformable-DETR++ trained with collaborative hybrid assignments.

Training adds, on top of the one-to-one detector:
  1. a multi-scale adapter turning the encoder memory into J feature maps;
  2. K auxiliary one-to-many heads (ATSS, Faster R-CNN, ...) on those maps, with their own
     assigners and losses (the "encoder loss" of the global loss);
  3. customized positive queries: each head's positive boxes become an extra query group
     that runs through the shared decoder, supervised with the head's own assignment.
Evaluation runs the plain detector only (``inference_model`` drops the rest).
"""
from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
from torch import nn

from codetr.box_ops import box_xyxy_to_cxcywh

from .deformable_detr import DeformableDETRPP
from .heads.common import AuxPositives, reduce_mean
from .position_encoding import coord_sine_embed


class PositiveQueryEmbedding(nn.Module):
    """Positive boxes and features -> decoder queries, for one head.

    PE(box) (512-d sine embedding of normalised cx, cy, w, h) -> Linear + LayerNorm -> split
    into position (C) and content (C); content += LayerNorm(Linear(feature)); position += a
    learned per-head embedding: a C-vector, or with ``head_embed="scalar"`` the single number
    per head that the official implementation ends up with (its ``nn.Embedding(K, 1, ...)``).
    """

    def __init__(self, d_model: int, head_embed: Literal["vector", "scalar"] = "vector"):
        super().__init__()
        self.d_model = d_model
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_norm = nn.LayerNorm(2 * d_model)
        self.feat_trans = nn.Linear(d_model, d_model)
        self.feat_norm = nn.LayerNorm(d_model)
        self.head_embed = nn.Parameter(torch.zeros(d_model if head_embed == "vector" else 1))
        nn.init.normal_(self.head_embed, std=0.02)

    def forward(self, boxes: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes [B, M, 4] cxcywh in [0, 1] (constants), feats [B, M, C] ->
        (content [B, M, C], position [B, M, C])."""
        emb = self.pos_norm(self.pos_trans(coord_sine_embed(boxes, self.d_model // 2)))
        position, content = emb.split(self.d_model, -1)
        content = content + self.feat_norm(self.feat_trans(feats))
        return content, position + self.head_embed


class CoDETR(DeformableDETRPP):
    """Deformable-DETR++ with K auxiliary heads (K = 0 is exactly the baseline: no extra
    modules, same forward).

    Args (besides DeformableDETRPP's):
        aux_heads: head name -> head module (see ``models/heads/common.py`` for the
            contract); its order is the order of the loss terms.
        adapter: encoder memory -> J maps (``MultiScaleAdapter`` / ``SingleScaleAdapter``);
            required when aux_heads is not empty.
        lambda1: weight of the positive-query losses.
        lambda2: weight of the auxiliary heads' losses; they are multiplied by
            num_decoder_layers * lambda2 (the global loss sums the encoder term over the
            decoder layers, so 6 x 2 = 12 in the paper).
        min_group_size, max_group_size: bounds of a head's query group size M (9 and 300):
            M = clamp(max positives per image, 9, 300), so tiny groups still give the
            decoder's self-attention some context and huge ones stay affordable.
        head_embed: see ``PositiveQueryEmbedding``.
    """

    def __init__(self, *args, aux_heads: Optional[dict[str, nn.Module]] = None, adapter: Optional[nn.Module] = None,
                 lambda1: float = 1.0, lambda2: float = 2.0, min_group_size: int = 9, max_group_size: int = 300,
                 head_embed: Literal["vector", "scalar"] = "vector", **kwargs):
        super().__init__(*args, **kwargs)
        aux_heads = dict(aux_heads or {})
        if aux_heads and adapter is None:
            raise ValueError("aux_heads need an adapter")
        self.aux_heads = nn.ModuleDict(aux_heads)
        self.adapter = adapter if aux_heads else None
        self.positive_queries = nn.ModuleDict(
            {name: PositiveQueryEmbedding(self.decoder.d_model, head_embed) for name in aux_heads})
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.min_group_size, self.max_group_size = min_group_size, max_group_size

    def inference_model(self) -> DeformableDETRPP:
        """A plain DeformableDETRPP holding (copies of) this model's detector weights and no
        auxiliary parameter; it gives identical detections."""
        parts = copy.deepcopy((self.backbone, self.neck, self.encoder, self.decoder, self.criterion))
        backbone, neck, encoder, decoder, criterion = parts
        plain = DeformableDETRPP(backbone, neck, encoder, decoder, self.num_classes, num_queries=self.num_queries,
                                 criterion=criterion, num_levels=self.num_levels, proposal_size=self.proposal_size,
                                 num_detections=self.num_detections).to(self.level_embed.device)
        aux = ("aux_heads.", "adapter.", "positive_queries.")
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith(aux)})
        if hasattr(self, "config"):  # set by config.build_model
            plain.config = self.config
        return plain.train(self.training)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: Optional[list[dict]] = None,
                orig_sizes: Optional[torch.Tensor] = None, eval_head: Optional[str] = None):
        """Same inputs and eval output as ``DeformableDETRPP.forward``.

        Training returns a flat dict of weighted losses whose sum is the global loss:
            "one_to_one.*"   the detector's losses (last layer, "d{i}." layers, "enc.")
            "<head>.*"       each auxiliary head's own losses, x num_decoder_layers * lambda2
            "aux.<head>.*"   the head's positive-query group, every decoder layer, x lambda1
        ``eval_head="atss"`` (eval only) decodes with that auxiliary head instead (a
        diagnostic; the head's NMS applies).
        """
        if not self.training:
            if eval_head is None:
                return super().forward(images, masks, targets, orig_sizes)
            return self._predict_with_head(eval_head, images, masks, targets, orig_sizes)
        if targets is None or self.criterion is None:
            raise ValueError("training needs targets and a criterion")
        enc = self.encode(images, masks)
        if self.aux_heads:  # every query group attends to the same memory: project it once
            enc["memory_values"] = self.decoder.project_memory(enc["memory"], enc["padding_mask"])
        query, ref, enc_outputs = self.select_queries(enc)
        outputs = {**self.decode(query, ref, enc), "enc_outputs": enc_outputs}
        norm_targets = self.normalise_targets(targets, masks)
        losses = {f"one_to_one.{k}": v for k, v in self.criterion(outputs, norm_targets).items()}
        if not self.aux_heads:
            return losses
        feats = self.adapter(enc["memory"], enc["spatial_shapes"])
        image_sizes = self._target_sizes(targets, masks)
        head_weight = len(self.decoder.layers) * self.lambda2
        for name, head in self.aux_heads.items():
            head_losses, positives = head(feats, targets, image_sizes)
            losses.update({f"{name}.{k}": v * head_weight for k, v in head_losses.items()})
            group_losses = self._positive_query_losses(name, positives, image_sizes, enc)
            losses.update({f"aux.{name}.{k}": v * self.lambda1 for k, v in group_losses.items()})
        return losses

    # ------------------------------------------------------------ positive queries

    def make_group(self, positives: AuxPositives, image_sizes: torch.Tensor):
        """Arrange one head's positives into a query group of size M per image.

        M = clamp(max_b P_b, min_group_size, max_group_size). Images with more positives keep
        a random subset; images with fewer are padded with the head's negatives (cycled if
        there are too few), which carry the background label and no box loss.

        Returns boxes [B, M, 4] cxcywh normalised to the unpadded image (detached), feats
        [B, M, C], and targets: B dicts {"labels" [P'_b], "boxes" [P'_b, 4] cxcywh
        normalised}, the positives being the group's first P'_b queries.
        """
        counts = [len(b) for b in positives.pos_boxes]
        M = min(max(max(counts, default=0), self.min_group_size), self.max_group_size)
        boxes, feats, targets = [], [], []
        for b, (h, w) in enumerate(image_sizes.tolist()):
            pb, pf = positives.pos_boxes[b], positives.pos_feats[b]
            labels, gts = positives.pos_labels[b], positives.pos_gt_boxes[b]
            if len(pb) > M:
                keep = torch.randperm(len(pb), device=pb.device)[:M]
                pb, pf, labels, gts = pb[keep], pf[keep], labels[keep], gts[keep]
            need = M - len(pb)
            nb, nf = positives.neg_boxes[b], positives.neg_feats[b]
            if need and len(nb) == 0:  # no negatives at all: whole-image boxes, zero features
                nb = pb.new_tensor([[0.0, 0.0, w, h]])
                nf = pf.new_zeros(1, pf.shape[1])
            if need:
                idx = torch.arange(need, device=nb.device) % len(nb)
                pb, pf = torch.cat((pb, nb[idx])), torch.cat((pf, nf[idx]))
            scale = pb.new_tensor([w, h, w, h])
            boxes.append(box_xyxy_to_cxcywh((pb.detach() / scale).clamp(0, 1)))
            feats.append(pf)
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(gts.float() / scale)})
        return torch.stack(boxes), torch.stack(feats), targets

    def _positive_query_losses(self, name: str, positives: AuxPositives, image_sizes: torch.Tensor,
                               enc: dict) -> dict[str, torch.Tensor]:
        """One head's group through the shared decoder; the one-to-one losses (focal, L1,
        GIoU) on every layer against the head's assignment (no Hungarian matching),
        normalised by the group's positives averaged over processes."""
        boxes, feats, targets = self.make_group(positives, image_sizes)
        # The heads give fp32 boxes (fp32 even under autocast); a float64 model decodes in float64.
        boxes = boxes.to(self.positive_queries[name].pos_trans.weight.dtype)
        content, position = self.positive_queries[name](boxes, feats)
        out = self.decode(content, boxes, enc, query_pos=position)
        indices = [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]
        n = reduce_mean(torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=boxes.device))
        n = max(float(n), 1.0)
        return self.criterion.decoder_layers(out, targets, n, indices)

    @torch.no_grad()
    def _predict_with_head(self, name, images, masks, targets, orig_sizes) -> list[dict]:
        if name not in self.aux_heads:
            raise ValueError(f"eval_head: {name!r} is not one of this model's heads {list(self.aux_heads)}")
        enc = self.encode(images, masks)
        sizes = self._image_sizes(masks) if targets is None else self._target_sizes(targets, masks)
        dets = self.aux_heads[name].predict(self.adapter(enc["memory"], enc["spatial_shapes"]), sizes)
        orig = self._orig_sizes(masks, targets, orig_sizes).float()
        out = []
        for d, s, o in zip(dets, sizes.float(), orig):
            f = (o / s).flip(0)  # (w, h) scale
            out.append({**d, "boxes": d["boxes"] * torch.cat((f, f))})
        return out
