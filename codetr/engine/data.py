"""Data loading for training: transforms from the preset, deterministic sampling and
augmentation (independent of worker count, exact on resume), DDP sharding."""
from __future__ import annotations

import functools
import math
from typing import Iterator

import torch

from codetr.config import DataConfig
from codetr.data import CocoDetection, collate, make_coco_transforms


def make_transforms(cfg: DataConfig, train: bool):
    """The preset's DETR-style transforms (``make_coco_transforms`` with its sizes)."""
    return make_coco_transforms(train, scales=cfg.train_scales, max_size=cfg.max_size,
                                crop_sizes=cfg.crop_sizes, resize_before_crop=cfg.resize_before_crop)


def build_dataset(cfg: DataConfig, ann_file, images_dir, train: bool) -> CocoDetection:
    return CocoDetection(images_dir, ann_file, transforms=make_transforms(cfg, train), train=train)


class SeededAugmentation(torch.utils.data.Dataset):
    """Runs the wrapped dataset's random transforms under a torch RNG seeded by
    (seed, epoch, index): the same sample gets the same augmentation whatever the worker
    count, and a resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF)
            return self.dataset[index]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of a permutation seeded by (seed, epoch); with a world of several processes,
    the permutation is padded (repeating its head) to a multiple of world_size * batch_size
    and process ``rank`` takes its strided share, so every rank runs the same number of
    steps. ``start`` skips the first batches (resuming mid-epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
        per_step = self.batch_size * self.world_size
        total = math.ceil(self.size / per_step) * per_step
        order = (order * math.ceil(total / max(self.size, 1)))[:total]
        mine = order[self.rank::self.world_size]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.start:])

    def __len__(self) -> int:
        return max(len(self._batches()) - self.start, 0)

    @staticmethod
    def steps_per_epoch(size: int, batch_size: int, world_size: int = 1) -> int:
        return math.ceil(size / (batch_size * world_size))


def train_loader(dataset: SeededAugmentation, batch_size: int, epoch: int, start: int, seed: int,
                 num_workers: int, size_divisibility: int, rank: int = 0, world_size: int = 1):
    dataset.epoch = epoch  # pickled into the workers when the iterator is created
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, rank, world_size, start)
    # Its own generator: creating the iterator must not consume the global RNG, which is
    # part of the training state that a resume restores.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility))


def eval_loader(dataset, batch_size: int, num_workers: int, size_divisibility: int, rank: int = 0,
                world_size: int = 1):
    indices = list(range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility))
