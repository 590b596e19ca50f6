"""Batching images of different sizes: zero-pad to a common size plus a padding mask."""

from __future__ import annotations

import torch


def collate(batch, size_divisibility: int = 1):
    """Collate ``[(image [3, H_i, W_i], target), ...]`` into a padded batch.

    Returns:
        images  float [B, 3, Hmax, Wmax]  each image top-left aligned, zeros elsewhere
        masks   bool  [B, Hmax, Wmax]     True on padding, False on image pixels
        targets list of the B target dicts (unchanged; boxes stay in image pixels, which the
                top-left alignment keeps valid in the padded frame)

    ``Hmax``/``Wmax`` are rounded up to a multiple of ``size_divisibility`` (backbones with
    stride-32 outputs want that); for a DataLoader use
    ``functools.partial(collate, size_divisibility=32)``.
    """
    images, targets = zip(*batch)
    c = images[0].shape[0]
    hmax = max(int(im.shape[-2]) for im in images)
    wmax = max(int(im.shape[-1]) for im in images)
    d = max(int(size_divisibility), 1)
    hmax, wmax = -(-hmax // d) * d, -(-wmax // d) * d
    out = images[0].new_zeros((len(images), c, hmax, wmax))
    masks = torch.ones((len(images), hmax, wmax), dtype=torch.bool)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        out[i, :, :h, :w].copy_(im)
        masks[i, :h, :w] = False
    return out, masks, list(targets)
