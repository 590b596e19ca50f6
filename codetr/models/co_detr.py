"""Co-DETR: a query-based detector trained with collaborative hybrid assignments.

Training adds, around any base detector of ``detector.py``'s protocol:
  1. a multi-scale adapter turning the encoder memory into J feature maps;
  2. K auxiliary one-to-many heads (ATSS, Faster R-CNN, ...) on those maps, with their own
     assigners and losses (the "encoder loss" of the global loss);
  3. customized positive queries: each head's positive boxes become an extra query group
     (as the detector's ``positive_query_embedding`` defines) that runs through the shared
     decoder, supervised with the head's own assignment.
Evaluation runs the detector alone (``inference_model`` returns it).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from codetr.box_ops import box_xyxy_to_cxcywh

from .detector import image_sizes, normalise_targets, output_sizes, target_sizes
from .heads.common import AuxPositives, reduce_mean


class CoDETR(nn.Module):
    """Args:
        detector: the base detector (protocol in ``detector.py``), e.g. DeformableDETRPP.
        adapter: encoder memory -> J maps (``MultiScaleAdapter`` / ``SingleScaleAdapter``);
            required when aux_heads is not empty.
        aux_heads: head name -> head module (see ``models/heads/common.py`` for the
            contract); its order is the order of the loss terms. Empty: K = 0, the model is
            the detector alone (same forward, same parameters under ``detector.``).
        lambda1: weight of the positive-query losses.
        lambda2: weight of the auxiliary heads' losses; they are multiplied by
            num_decoder_layers * lambda2 (the global loss sums the encoder term over the
            decoder layers, so 6 x 2 = 12 in the paper).
        min_group_size, max_group_size: bounds of a head's query group size M (9 and 300):
            M = clamp(max positives per image, 9, 300), so tiny groups still give the
            decoder's self-attention some context and huge ones stay affordable.
        head_embed: passed to the detector's ``positive_query_embedding``.
    """

    def __init__(self, detector: nn.Module, adapter: Optional[nn.Module] = None,
                 aux_heads: Optional[dict[str, nn.Module]] = None, lambda1: float = 1.0, lambda2: float = 2.0,
                 min_group_size: int = 9, max_group_size: int = 300,
                 head_embed: Literal["scalar", "vector"] = "scalar"):
        super().__init__()
        aux_heads = dict(aux_heads or {})
        if aux_heads and adapter is None:
            raise ValueError("aux_heads need an adapter")
        self.detector = detector
        self.aux_heads = nn.ModuleDict(aux_heads)
        self.adapter = adapter if aux_heads else None
        self.positive_queries = nn.ModuleDict(
            {name: detector.positive_query_embedding(len(aux_heads), head_embed) for name in aux_heads})
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.min_group_size, self.max_group_size = min_group_size, max_group_size

    @property
    def criterion(self):
        return self.detector.criterion

    def inference_model(self) -> nn.Module:
        """The detector itself (shared, not copied): no auxiliary parameter, identical
        detections."""
        return self.detector

    def forward(self, images: torch.Tensor, masks: torch.Tensor, targets: Optional[list[dict]] = None,
                orig_sizes: Optional[torch.Tensor] = None, eval_head: Optional[str] = None):
        """Same inputs and eval output as the detector's ``forward``.

        Training returns a flat dict of weighted losses whose sum is the global loss:
            "one_to_one.*"   the detector's losses (last layer, "d{i}." layers, "enc.")
            "<head>.*"       each auxiliary head's own losses, x num_decoder_layers * lambda2
            "aux.<head>.*"   the head's positive-query group, every decoder layer, x lambda1
        ``eval_head="atss"`` (eval only) decodes with that auxiliary head instead (a
        diagnostic; the head's NMS applies).
        """
        det = self.detector
        if not self.training:
            if eval_head is None:
                return det(images, masks, targets, orig_sizes)
            return self._predict_with_head(eval_head, images, masks, targets, orig_sizes)
        if targets is None:
            raise ValueError("training needs targets")
        memory = det.encode(images, masks)
        if self.aux_heads:  # every query group attends to the same memory: project it once
            memory = memory.with_values(det.decoder.project_memory(memory))
        norm_targets = normalise_targets(targets, masks)
        losses = {f"one_to_one.{k}": v for k, v in det.loss(det.detect(memory), norm_targets).items()}
        if not self.aux_heads:
            return losses
        feats = self.adapter(memory.memory, memory.shapes)
        sizes = target_sizes(targets, masks)
        head_weight = det.num_decoder_layers * self.lambda2
        for name, head in self.aux_heads.items():
            head_losses, positives = head(feats, targets, sizes)
            losses.update({f"{name}.{k}": v * head_weight for k, v in head_losses.items()})
            group_losses = self._positive_query_losses(name, positives, sizes, memory)
            losses.update({f"aux.{name}.{k}": v * self.lambda1 for k, v in group_losses.items()})
        return losses

    # ------------------------------------------------------------ positive queries

    def make_group(self, positives: AuxPositives, image_sizes: torch.Tensor):
        """Arrange one head's positives into a query group of size M per image.

        M = clamp(max_b P_b, min_group_size, max_group_size). Images with more positives keep
        a random subset; images with fewer are padded with the head's negatives (cycled if
        there are too few), which carry the background label and no box loss.

        Returns boxes [B, M, 4] cxcywh normalised to the unpadded image, not clipped (an
        anchor crossing the border keeps its centre and size, as the official), detached;
        feats [B, M, C]; and targets: B dicts {"labels" [P'_b], "boxes" [P'_b, 4] cxcywh
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
            boxes.append(box_xyxy_to_cxcywh(pb.detach() / scale))
            feats.append(pf)
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(gts.float() / scale)})
        return torch.stack(boxes), torch.stack(feats), targets

    def _positive_query_losses(self, name: str, positives: AuxPositives, image_sizes: torch.Tensor,
                               memory) -> dict[str, torch.Tensor]:
        """One head's group through the shared decoder; the one-to-one losses (focal, L1,
        GIoU) on every layer against the head's assignment (no Hungarian matching),
        normalised by the group's positives averaged over processes."""
        boxes, feats, targets = self.make_group(positives, image_sizes)
        embed = self.positive_queries[name]
        # The heads give fp32 boxes (fp32 even under autocast); a float64 model decodes in float64.
        boxes = boxes.to(next(embed.parameters()).dtype)
        content, query_pos, reference = embed(boxes, feats)
        out = self.detector.decode_group(content, query_pos, reference, memory)
        n = reduce_mean(torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=boxes.device))
        return self.detector.group_loss(out, targets, max(float(n), 1.0))

    @torch.no_grad()
    def _predict_with_head(self, name, images, masks, targets, orig_sizes) -> list[dict]:
        if name not in self.aux_heads:
            raise ValueError(f"eval_head: {name!r} is not one of this model's heads {list(self.aux_heads)}")
        memory = self.detector.encode(images, masks)
        sizes = image_sizes(masks) if targets is None else target_sizes(targets, masks)
        dets = self.aux_heads[name].predict(self.adapter(memory.memory, memory.shapes), sizes)
        orig = output_sizes(masks, targets, orig_sizes).float()
        out = []
        for d, s, o in zip(dets, sizes.float(), orig):
            f = (o / s).flip(0)  # (w, h) scale
            out.append({**d, "boxes": d["boxes"] * torch.cat((f, f))})
        return out
