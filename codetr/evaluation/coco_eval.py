"""COCO box AP through pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class CocoEvaluator:
    """Accumulates detections and scores them with COCOeval (iouType="bbox").

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection(...).coco``.
        label_to_cat_id: contiguous label -> COCO category id (dict or sequence).
        verbose: if False, pycocotools' prints are silenced.

    Only the images passed to :meth:`update` are evaluated (an image passed with no boxes
    counts its objects as missed); if ``update`` was never called, every image of
    ``coco_gt`` is evaluated.
    """

    def __init__(self, coco_gt: COCO, label_to_cat_id: Union[Mapping[int, int], Sequence[int]],
                 verbose: bool = False):
        self.coco_gt = coco_gt
        self.label_to_cat_id = label_to_cat_id
        self.verbose = verbose
        self.results: list[dict] = []
        self.img_ids: set[int] = set()
        self.coco_eval: Optional[COCOeval] = None
        self._summary: Optional[dict] = None

    def update(self, predictions: Mapping[int, Mapping]) -> None:
        """predictions: image_id -> {"boxes" [K, 4] xyxy absolute pixels of the original image,
        "scores" [K], "labels" [K] contiguous labels} (tensors, arrays or lists)."""
        for image_id, p in predictions.items():
            image_id = int(image_id)
            self.img_ids.add(image_id)
            boxes = _to_numpy(p["boxes"]).astype(np.float64).reshape(-1, 4)
            scores = _to_numpy(p["scores"]).astype(np.float64).reshape(-1)
            labels = _to_numpy(p["labels"]).astype(np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: boxes/scores/labels lengths differ "
                                 f"({len(boxes)}, {len(scores)}, {len(labels)})")
            for (x1, y1, x2, y2), s, l in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                self.results.append({"image_id": image_id, "category_id": int(self.label_to_cat_id[l]),
                                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
        self._summary = None

    def _quiet(self):
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def _load_results(self) -> COCO:
        if self.results:
            # loadRes adds keys to the dicts it gets: hand it copies so write_results stays clean.
            return self.coco_gt.loadRes([dict(r) for r in self.results])
        # loadRes crashes on an empty list; an empty result set is still a valid answer
        # (AP 0 for every category that has objects), so build it by hand.
        dt = COCO()
        dt.dataset = {"images": list(self.coco_gt.dataset["images"]),
                      "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
                      "annotations": []}
        dt.createIndex()
        return dt

    def evaluate(self) -> COCOeval:
        """Run evaluate + accumulate; returns the COCOeval (``.eval["precision"]`` etc.)."""
        with self._quiet():
            coco_dt = self._load_results()
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            if self.img_ids:
                ev.params.imgIds = sorted(self.img_ids)
            ev.evaluate()
            ev.accumulate()
        self.coco_eval = ev
        return ev

    def summarize(self) -> dict:
        """Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
        "ARm", "ARl": float in [0, 1] or -1 (no ground truth in that bucket), "per_class":
        {class name: AP@[.5:.95] or -1}}."""
        if self._summary is not None:
            return self._summary
        ev = self.evaluate()
        with self._quiet():
            ev.summarize()
        out = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
        # precision: [T iou thresholds, R recall points, K categories, A areas, M maxDets];
        # area "all" (0) and the largest maxDets (-1), as in stats[0]. -1 marks "no gt".
        precision = ev.eval["precision"]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[self.coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else -1.0
        out["per_class"] = per_class
        self._summary = out
        return out

    def write_results(self, path: Union[str, Path]) -> Path:
        """Write the detections as a COCO results json (list of image_id, category_id,
        bbox xywh, score), loadable by ``COCO.loadRes``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path

    def format_table(self) -> str:
        """Printable summary: the 12 COCO numbers then AP per class (x100; '-' = no gt)."""
        s = self.summarize()
        fmt = lambda v: "-" if v < 0 else f"{100 * v:.1f}"  # noqa: E731
        lines = ["  ".join(f"{k:>5}" for k in STAT_NAMES),
                 "  ".join(f"{fmt(s[k]):>5}" for k in STAT_NAMES), ""]
        width = max([len(n) for n in s["per_class"]] + [5])
        lines.append(f"{'class':<{width}}  {'AP':>5}")
        lines += [f"{n:<{width}}  {fmt(v):>5}" for n, v in s["per_class"].items()]
        return "\n".join(lines)
