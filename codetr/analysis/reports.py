"""The work behind ``codetr analyze instability`` and ``codetr analyze discriminability``:
read runs / checkpoints, write CSV and PNG files."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import plots
from .discriminability import default_thresholds, foreground_mask, image_maps, iof_iob
from .instability import CSV_NAME, read_instability_csv


def default_labels(paths: Sequence[Path], checkpoints: bool = False) -> list[str]:
    """Short distinct names: a run folder's name; for checkpoints, the folder holding it
    (runs/k0/last.pt -> k0), then folder/file, then the whole path when those collide."""
    paths = [Path(p).resolve() for p in paths]  # "last.pt" in the working folder has a parent name too
    options = ([lambda p: p.parent.name, lambda p: f"{p.parent.name}/{p.name}"] if checkpoints
               else [lambda p: p.name])
    for name in options:
        labels = [name(p) for p in paths]
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def instability_report(run_dirs: Sequence[Path], out: Path, labels: Optional[Sequence[str]] = None) -> Path:
    """Combine the runs' instability.csv into OUT/instability.csv (run, epoch, IS) and plot
    OUT/instability.png. Returns the PNG path. FileNotFoundError when a run has no CSV."""
    labels = list(labels or default_labels(run_dirs))
    series = {}
    for label, run in zip(labels, run_dirs):
        path = Path(run) / CSV_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (train with --record-instability N)")
        series[label] = read_instability_csv(path)
    plots.require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "instability.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "epoch", "IS"])
        w.writerows((label, e, v) for label, rows in series.items() for e, v in rows)
    plots.plot_instability(series, out / "instability.png")
    return out / "instability.png"


def curve_area(iof: torch.Tensor, iob: torch.Tensor) -> float:
    """Area under IoF as a function of IoB, from IoF, IoB [T] on ascending thresholds.

    Walking the thresholds downwards moves both fractions up from (0, 0); the path is closed
    at (1, 1) and integrated with trapezoids: 1 when every foreground cell outscores every
    background cell, 0.5 for scores blind to objects, 0 for the reverse ranking."""
    x = torch.cat((torch.tensor([0.0]), iob.float().flip(0), torch.tensor([1.0])))
    y = torch.cat((torch.tensor([0.0]), iof.float().flip(0), torch.tensor([1.0])))
    return float(torch.trapezoid(y, x))


def discriminability_report(checkpoints: Sequence[Path], ann_file: Path, images_dir: Path, out: Path,
                            num_images: int = 50, num_overlays: int = 4, labels: Optional[Sequence[str]] = None,
                            device: str = "cpu", num_thresholds: int = 101) -> dict[str, dict]:
    """IoF-IoB curves of each checkpoint's encoder on the first ``num_images`` images of the
    dataset (eval transform), pooled over the images.

    Writes OUT/curves.csv (label, checkpoint, threshold, IoF, IoB), OUT/curves.png (all
    checkpoints on one plot) and OUT/overlay_<image id>.png for the first ``num_overlays``
    images (one panel per checkpoint). Returns label -> {"auc": area under IoF(IoB),
    "images": count, "foreground_fraction": share of foreground cells}.
    ValueError when a file is not a codetr checkpoint.
    """
    from codetr.engine.data import build_dataset
    from codetr.engine.predictor import load_trained

    plots.require_matplotlib()  # fail before the slow part
    labels = list(labels or default_labels(checkpoints, checkpoints=True))
    thresholds = default_thresholds(num_thresholds)
    curves, overlays, summary = {}, {}, {}
    for label, path in zip(labels, checkpoints):
        model, _ = load_trained(path)
        model.to(device)
        dataset = build_dataset(model.config.data, ann_file, images_dir, train=False)
        indices = range(min(num_images, len(dataset)))
        scores, fgs = [], []
        for k, m in enumerate(image_maps(model, dataset, indices, device, model.config.data.size_divisibility)):
            scores.append(m.score)
            fgs.append(foreground_mask(m.boxes, tuple(m.score.shape), m.stride))
            if k < num_overlays:
                overlays.setdefault(m.image_id, []).append((label, m))
        iof, iob = iof_iob(scores, fgs, thresholds)
        curves[label] = (thresholds, iof, iob)
        cells = sum(f.numel() for f in fgs)
        summary[label] = {"auc": curve_area(iof, iob), "images": len(scores),
                          "foreground_fraction": sum(int(f.sum()) for f in fgs) / max(cells, 1)}

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "checkpoint", "threshold", "IoF", "IoB"])
        for (label, (t, iof, iob)), path in zip(curves.items(), checkpoints):
            w.writerows((label, str(path), f"{a:.4f}", f"{b:.6f}", f"{c:.6f}")
                        for a, b, c in zip(t.tolist(), iof.tolist(), iob.tolist()))
    plots.plot_iof_iob(curves, out / "curves.png")
    for image_id, panels in overlays.items():
        plots.plot_overlay(panels, out / f"overlay_{image_id}.png")
    return summary
