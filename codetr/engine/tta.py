"""Test-time augmentation: horizontal flip and multi-scale views of each image, their
detections merged by weighted box fusion or box voting.

``TestTimeAugmentation(detector)`` is called as the detector itself is
(``(images, masks, orig_sizes) -> B dicts``), so ``evaluate`` and ``Predictor`` take it in
its place; it works over an eager model and an ``ExportedDetector`` alike (a fixed-size
export needs room for the largest view).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from codetr.data import collate
from codetr.ops import batched_nms, box_iou

from ..models.detector import image_sizes


def weighted_box_fusion(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, num_views: int,
                        iou_threshold: float = 0.55) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted box fusion (Solovyev, Wang and Gabruseva, 2021) of the detections of
    ``num_views`` views of one image: boxes [N, 4] xyxy, scores [N], labels [N].

    In decreasing score order, a box joins the first cluster of its label whose fused box it
    overlaps with IoU > iou_threshold, else starts one. A cluster's box is the score-weighted
    mean of its boxes; its score the mean score times min(n, num_views) / num_views, so that
    what only some views found is down-weighted. Returns (boxes, scores, labels), best first.
    """
    order = scores.argsort(descending=True)
    boxes, scores, labels = boxes[order].float(), scores[order].float(), labels[order]
    N = len(boxes)
    # Clusters 0..k-1: fused box, sum of score * box, sum of scores, member count, label.
    fused, sums, weights = boxes.new_zeros(N, 4), boxes.new_zeros(N, 4), scores.new_zeros(N)
    counts, cluster_labels = scores.new_zeros(N), labels.new_zeros(N)
    k = 0
    for i in range(N):
        j = k
        if k:
            ious = box_iou(boxes[i : i + 1], fused[:k])[0].masked_fill(cluster_labels[:k] != labels[i], -1.0)
            best = int(ious.argmax())
            if ious[best] > iou_threshold:
                j = best
        if j == k:
            cluster_labels[k] = labels[i]
            k += 1
        sums[j] += boxes[i] * scores[i]
        weights[j] += scores[i]
        counts[j] += 1
        fused[j] = sums[j] / weights[j].clamp(min=1e-12)
    out_scores = weights[:k] / counts[:k] * counts[:k].clamp(max=num_views) / num_views
    order = out_scores.argsort(descending=True)
    return fused[:k][order], out_scores[order], cluster_labels[:k][order]


def box_voting(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, num_views: int,
               iou_threshold: float = 0.55) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box voting (Gidaris and Komodakis, 2015): class-wise NMS at iou_threshold over the
    views' detections, then each kept box becomes the score-weighted mean of every box of its
    label that overlaps it with IoU >= iou_threshold; scores are the kept boxes'. Same
    arguments and result as ``weighted_box_fusion`` (num_views is unused)."""
    boxes, scores = boxes.float(), scores.float()
    keep = batched_nms(boxes, scores, labels, iou_threshold)
    if not len(keep):
        return boxes[keep], scores[keep], labels[keep]
    overlap = (box_iou(boxes[keep], boxes) >= iou_threshold) & (labels[keep][:, None] == labels[None])
    w = overlap.float() * scores[None]
    voted = (w @ boxes) / w.sum(1, keepdim=True).clamp(min=1e-12)
    return voted, scores[keep], labels[keep]


MERGERS = {"wbf": weighted_box_fusion, "vote": box_voting}


class TestTimeAugmentation:
    """Runs ``detector`` on flipped and rescaled views of each image and merges their
    detections.

    Args:
        detector: called as ``detector(images, masks, orig_sizes=...)`` -> B dicts (an eager
            inference model or an ``ExportedDetector``).
        scales: view sizes relative to the input (1.0: as given; 0.8 and 1.2 shrink and grow
            both sides), each view resized bilinearly from the eval-transformed image.
        flip: also each scale mirrored left-right (its boxes mirrored back). With one scale
            and no flip only the merge runs, on the detector's own detections (how much of a
            gain is the merge's: benchmarks/bccd_tta.py).
        merge: "vote" (NMS + box voting) or "wbf" (weighted box fusion); vote was the better
            in each pairing on BCCD (benchmarks/results/bccd_tta.json).
        iou_threshold: the merge's IoU threshold.
        num_detections: detections kept per image after the merge (default: the most any
            view gave).
        size_divisibility: padding of the views' batch (the detector's).
        max_batch: views run at once.
    """

    def __init__(self, detector, scales: Sequence[float] = (1.0,), flip: bool = True,
                 merge: Literal["wbf", "vote"] = "vote", iou_threshold: float = 0.55,
                 num_detections: Optional[int] = None, size_divisibility: int = 32, max_batch: int = 4):
        if not scales or any(not (isinstance(s, (int, float)) and 0 < s <= 4) for s in scales):
            raise ValueError(f"scales: expected factors in (0, 4], got {scales!r}")
        if merge not in MERGERS:
            raise ValueError(f"merge: expected one of {sorted(MERGERS)}, got {merge!r}")
        self.detector, self.scales, self.flip = detector, tuple(float(s) for s in scales), flip
        self.merge, self.iou_threshold, self.num_detections = merge, iou_threshold, num_detections
        self.size_divisibility, self.max_batch = size_divisibility, max_batch
        self.training = False

    def eval(self) -> "TestTimeAugmentation":
        self.detector.eval()
        return self

    def train(self, mode: bool = True) -> "TestTimeAugmentation":
        if mode:
            raise RuntimeError("test-time augmentation is inference-only")
        return self.eval()

    def views(self, image: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
        """image [3, h, w] (unpadded, normalised) -> [(view [3, h', w'], flipped), ...]."""
        out = []
        h, w = image.shape[-2:]
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            view = image if size == (h, w) else F.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False, antialias=s < 1)[0]
            out.append((view, False))
            if self.flip:
                out.append((view.flip(-1), True))
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, masks: torch.Tensor, orig_sizes: Optional[torch.Tensor] = None):
        sizes = image_sizes(masks)
        orig_sizes = sizes if orig_sizes is None else torch.as_tensor(orig_sizes)
        results = []
        for image, (h, w), orig in zip(images, sizes.tolist(), orig_sizes):
            views = self.views(image[:, :h, :w])
            dets = []
            for start in range(0, len(views), self.max_batch):
                chunk = views[start : start + self.max_batch]
                x, m, _ = collate([(v, None) for v, _ in chunk], self.size_divisibility)
                out = self.detector(x.to(images.device), m.to(images.device),
                                    orig_sizes=orig[None].expand(len(chunk), 2).to(images.device))
                for (_, flipped), d in zip(chunk, out):
                    d = {k: v.cpu() for k, v in d.items()}
                    if flipped:  # x -> W - x in the original image's frame
                        W = float(orig[1])
                        d["boxes"] = torch.stack((W - d["boxes"][:, 2], d["boxes"][:, 1],
                                                  W - d["boxes"][:, 0], d["boxes"][:, 3]), -1)
                    dets.append(d)
            boxes, scores, labels = MERGERS[self.merge](
                torch.cat([d["boxes"] for d in dets]), torch.cat([d["scores"] for d in dets]),
                torch.cat([d["labels"] for d in dets]), len(dets), self.iou_threshold)
            n = self.num_detections or max(len(d["scores"]) for d in dets)
            results.append({"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]})
        return results
