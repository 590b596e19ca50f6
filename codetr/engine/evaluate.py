"""COCO evaluation of a detector over a dataset."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from codetr.data import CocoDetection
from codetr.evaluation import CocoEvaluator

from .data import eval_loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, device, batch_size: int = 2, num_workers: int = 0,
             size_divisibility: int = 32, amp: Optional[str] = None, evaluator: Optional[CocoEvaluator] = None,
             progress: bool = False) -> dict:
    """Run ``model`` (eval mode, restored afterwards) over ``dataset`` (eval transforms)
    and score it with COCOeval. Returns ``CocoEvaluator.summarize()``; pass ``evaluator``
    to keep the detections (``write_results``, ``format_table``); ``progress`` shows a
    progress bar (removed when done)."""
    evaluator = evaluator or CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    try:
        batches = eval_loader(dataset, batch_size, num_workers, size_divisibility)
        for images, masks, targets in tqdm(batches, desc="eval", disable=not progress, leave=False,
                                           dynamic_ncols=True):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(images.to(device), masks.to(device),
                            orig_sizes=torch.stack([t["orig_size"] for t in targets]).to(device))
            evaluator.update({t["image_id"]: {k: v.float().cpu() for k, v in o.items()}
                              for t, o in zip(targets, out)})
    finally:
        model.train(was_training)
    return evaluator.summarize()
