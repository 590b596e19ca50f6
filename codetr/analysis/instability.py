"""Matching instability (DN-DETR, used by Co-DETR's analysis): how many queries change
their one-to-one Hungarian match from one epoch to the next.

For a fixed subset of training images, preprocessed deterministically (the eval transform,
no augmentation), the last decoder layer's Hungarian assignment is recorded after every
epoch as one list per image: ``assignment[q]`` = index of the gt matched to query q, or -1
when q is unmatched. Then

    IS(e) = mean over images of #{q : assignment_e[q] != assignment_{e-1}[q]}

Queries are identified by their index in the decoder's query list (in the two-stage model,
the rank of their proposal in the encoder's top-K selection), as in DN-DETR.
"""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Sequence

import torch

from codetr.data import collate
from codetr.engine.data import make_transforms

CSV_NAME = "instability.csv"
ASSIGNMENTS_NAME = "instability_assignments.json"


def instability(prev: Sequence[int], cur: Sequence[int]) -> int:
    """Number of queries whose matched gt index differs between two assignments of one image
    (each: query index -> gt index, -1 when unmatched; both of length Q)."""
    if len(prev) != len(cur):
        raise ValueError(f"assignments of different lengths: {len(prev)} and {len(cur)} queries")
    return sum(int(a != b) for a, b in zip(prev, cur))


def mean_instability(prev: Sequence[Sequence[int]], cur: Sequence[Sequence[int]]) -> float:
    """IS between two epochs: ``instability`` averaged over the images (same images, same order)."""
    if len(prev) != len(cur) or not prev:
        raise ValueError(f"need the same non-zero number of images, got {len(prev)} and {len(cur)}")
    return sum(instability(p, c) for p, c in zip(prev, cur)) / len(prev)


@torch.no_grad()
def last_layer_assignment(model, images: torch.Tensor, masks: torch.Tensor, targets: list[dict]) -> list[list[int]]:
    """The one-to-one Hungarian assignment of the last decoder layer.

    images [B, 3, H, W], masks [B, H, W], targets with "boxes" [G, 4] xyxy pixels and
    "labels" [G] -> B lists of Q ints (gt index per query, -1 unmatched). The model runs in
    eval mode (no dropout) and is put back in its previous mode.
    """
    from codetr.models.detector import normalise_targets

    was_training = model.training
    model.eval()
    det = getattr(model, "detector", model)  # a CoDETR or its base detector
    try:
        out = det.detect(det.encode(images, masks))
        indices = det.criterion.matcher(out, normalise_targets(targets, masks))
    finally:
        model.train(was_training)
    num_queries = out["pred_logits"].shape[1]
    result = []
    for rows, cols in indices:
        a = [-1] * num_queries
        for q, g in zip(rows.tolist(), cols.tolist()):
            a[q] = g
        result.append(a)
    return result


class MatchingInstability:
    """Trainer callback recording IS per epoch on ``num_images`` training images.

    The images are drawn once (seeded by ``seed``, not by the run's seed, so runs to be
    compared see the same images) among those with at least one gt box: an image without
    objects has no matches and would only dilute the mean. Each image goes through the model
    alone (batch of one), so its padding never depends on other images.

    At train start the current model's assignment is the baseline (epoch 0, or the epoch a
    resumed run restarts from); after each epoch the new assignment is recorded. Rank 0
    writes, in the run's out_dir, ``instability.csv`` (columns epoch, IS; one row per epoch
    with a recorded predecessor) and ``instability_assignments.json`` ({"image_ids": [...],
    "assignments": {epoch: [one list per image]}}), rewritten after each epoch.

    The trained weights are used (not the EMA). The global RNG state is left untouched: the
    eval transform draws from it, and it is part of a run's exact-resume state.
    """

    def __init__(self, num_images: int = 50, seed: int = 0):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.seed = num_images, seed
        self.image_ids: list[int] = []
        self.assignments: dict[int, list[list[int]]] = {}  # epoch -> per-image assignments

    # ------------------------------------------------------------------ callback hooks

    def on_train_start(self, trainer) -> None:
        if trainer.rank != 0:
            return
        ds = copy.copy(trainer.train_set)  # same annotations, deterministic preprocessing
        ds.transforms = make_transforms(trainer.model_cfg.data, train=False)
        # _targets holds the boxes kept for training (crowd and invalid boxes dropped).
        candidates = [i for i, img_id in enumerate(ds.ids) if len(ds._targets[img_id][0])]
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(candidates), generator=g)[:self.num_images]
        self._indices = sorted(candidates[i] for i in order.tolist())
        self._dataset = ds
        self.image_ids = [ds.ids[i] for i in self._indices]
        self.assignments = {}

        epoch, partial = divmod(trainer.batches_done, trainer.steps_per_epoch)
        if trainer.cfg.resume:
            self._load_previous(trainer.out_dir, epoch)
        # Mid-epoch resume: the current weights are not an epoch's; without the saved
        # assignment of that epoch the next IS is simply not reported.
        if epoch not in self.assignments and not partial:
            self.assignments[epoch] = self.record(trainer)
        self._write(trainer.out_dir)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        if trainer.rank != 0:
            return
        self.assignments[epoch] = self.record(trainer)
        self._write(trainer.out_dir)

    # ------------------------------------------------------------------ internals

    def record(self, trainer) -> list[list[int]]:
        """The current model's assignment on every chosen image (a list per image)."""
        model, device = trainer.model, trainer.device
        devices = [device] if device.type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices):
            for i in self._indices:
                images, masks, targets = collate([self._dataset[i]], trainer.model_cfg.data.size_divisibility)
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                out += last_layer_assignment(model, images.to(device), masks.to(device), targets)
        return out

    def rows(self) -> list[tuple[int, float]]:
        """(epoch, IS) for each recorded epoch whose previous epoch is recorded too."""
        return [(e, mean_instability(self.assignments[e - 1], self.assignments[e]))
                for e in sorted(self.assignments) if e - 1 in self.assignments]

    def _load_previous(self, out_dir: Path, epoch: int) -> None:
        path = Path(out_dir) / ASSIGNMENTS_NAME
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        if saved.get("image_ids") != self.image_ids:
            return  # another subset (different num_images or seed): start afresh
        self.assignments = {int(e): a for e, a in saved["assignments"].items() if int(e) <= epoch}

    def _write(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / CSV_NAME, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "IS"])
            w.writerows(self.rows())
        (out_dir / ASSIGNMENTS_NAME).write_text(json.dumps(
            {"image_ids": self.image_ids, "assignments": {str(e): a for e, a in sorted(self.assignments.items())}}))


def read_instability_csv(path: str | Path) -> list[tuple[int, float]]:
    """(epoch, IS) rows of an ``instability.csv``."""
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r["IS"])) for r in csv.DictReader(f)]
