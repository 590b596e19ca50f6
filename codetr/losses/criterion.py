"""DETR set criterion: Hungarian matching, then focal + L1 + GIoU on the matched pairs."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from codetr.box_ops import box_cxcywh_to_xyxy

from .focal import sigmoid_focal_loss
from codetr.ops import generalized_box_iou_loss

if TYPE_CHECKING:  # the matcher imports the losses package: avoid an import cycle
    from codetr.assigners.hungarian import HungarianMatcher


class SetCriterion(nn.Module):
    """Args:
        num_classes: C (sigmoid classification, no background class).
        matcher: the one-to-one matcher.
        weight_cls, weight_bbox, weight_giou: loss weights (2, 5, 2 in Deformable-DETR++).
        alpha, gamma: focal loss parameters.

    ``forward(outputs, targets)`` with
        outputs: {"pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4] cxcywh normalised,
                  "aux_outputs": [same dict per earlier decoder layer] (optional),
                  "enc_outputs": {"pred_logits" [B, K, 1 or C], "pred_boxes" [B, K, 4]} (optional:
                  the two-stage proposals, every encoder token's (official) or the K selected
                  as queries (DINO), Hungarian-matched like the decoder's)}
        targets: B dicts, "labels" [G_b] int64, "boxes" [G_b, 4] cxcywh normalised.
    returns weighted losses (their sum is the training loss): "loss_cls", "loss_bbox",
        "loss_giou" for the last layer, "d{i}.loss_*" for aux layer i, "enc.loss_*" for the
        encoder proposals, which are class-agnostic (every target has label 0 there).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_cls: float = 2.0,
                 weight_bbox: float = 5.0, weight_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weight_cls, self.weight_bbox, self.weight_giou = weight_cls, weight_bbox, weight_giou
        self.alpha, self.gamma = alpha, gamma
        self.num_boxes_override: Optional[float] = None  # see fixed_num_boxes

    @staticmethod
    def num_boxes(targets: list[dict], device: torch.device, num_batches: int = 1) -> float:
        """The normaliser: target boxes per batch and per process, i.e. the count over all
        processes (``targets`` being this process's ``num_batches`` batches) divided by
        world_size * num_batches. The total is clamped to >= 1 before dividing (DETR clamps
        after), so that the gradient of a step equals that of one batch holding all its images
        whatever their split into processes and batches, even with fewer boxes than batches."""
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(float(n.item()), 1.0) / (world * num_batches)

    @contextlib.contextmanager
    def fixed_num_boxes(self, n: float) -> Iterator[None]:
        """Within the block, ``forward`` normalises by ``n`` instead of counting its own
        targets: gradient accumulation sets the count over all the batches of the optimizer
        step, which a single batch cannot know."""
        old, self.num_boxes_override = self.num_boxes_override, n
        try:
            yield
        finally:
            self.num_boxes_override = old

    def single(self, outputs: dict, targets: list[dict], num_boxes: float,
               indices=None) -> dict[str, torch.Tensor]:
        """The three weighted losses of one set of predictions; ``indices`` from the matcher
        (computed here when None)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if indices is None:
            indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        tgt_labels = torch.cat([t["labels"][g.to(t["labels"].device)] for t, (_, g) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][g.to(t["boxes"].device)] for t, (_, g) in zip(targets, indices)])

        onehot = torch.zeros_like(logits, dtype=torch.float32)
        onehot[batch_idx, query_idx, tgt_labels.to(logits.device)] = 1.0
        loss_cls = sigmoid_focal_loss(logits.float(), onehot, self.alpha, self.gamma).sum() / num_boxes

        src = boxes[batch_idx, query_idx].float()
        tgt = tgt_boxes.to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt),
                                             reduction="sum") / num_boxes
        return {"loss_cls": self.weight_cls * loss_cls, "loss_bbox": self.weight_bbox * loss_bbox,
                "loss_giou": self.weight_giou * loss_giou}

    def decoder_layers(self, outputs: dict, targets: list[dict], num_boxes: float,
                       indices=None) -> dict[str, torch.Tensor]:
        """``single`` on the last layer ("loss_*") and on each earlier one ("d{i}.loss_*");
        fixed ``indices`` (Co-DETR's positive queries) replace the matching on every layer."""
        losses = self.single(outputs, targets, num_boxes, indices)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"d{i}.{k}": v for k, v in self.single(aux, targets, num_boxes, indices).items()})
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        n = self.num_boxes_override
        if n is None:
            n = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self.decoder_layers(outputs, targets, n)
        if "enc_outputs" in outputs:
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update({f"enc.{k}": v for k, v in self.single(outputs["enc_outputs"], agnostic, n).items()})
        return losses
