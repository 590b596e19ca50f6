"""Figures for the analysis commands. matplotlib is an optional extra (``pip install
codetr[analysis]``): it is imported inside these functions only, through the object API
(``matplotlib.figure.Figure``), so no GUI backend or global pyplot state is involved."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


class MissingMatplotlib(ImportError):
    pass


def require_matplotlib() -> None:
    """Raise MissingMatplotlib, saying how to install it, when matplotlib is unavailable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingMatplotlib("plotting needs matplotlib: pip install codetr[analysis] "
                                "(or pip install matplotlib)") from e


def _figure(**kw):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_instability(series: dict[str, Sequence[tuple[int, float]]], path: Path) -> None:
    """One line per run: IS against epoch."""
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, rows in series.items():
        ax.plot([e for e, _ in rows], [v for _, v in rows], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("instability (queries changing match / image)")
    ax.set_title("Hungarian matching instability (last decoder layer)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_iof_iob(curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """curves: label -> (thresholds [T], IoF [T], IoB [T]). Left: IoF against IoB (the
    paper's curve); right: both against the threshold."""
    fig = _figure(figsize=(11, 4.5), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for i, (label, (t, iof, iob)) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(iob.tolist(), iof.tolist(), color=color, label=label)
        bx.plot(t.tolist(), iof.tolist(), color=color, label=f"{label} IoF")
        bx.plot(t.tolist(), iob.tolist(), color=color, linestyle="--", label=f"{label} IoB")
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle=":")
    ax.set(xlabel="IoB (background cells above threshold)", ylabel="IoF (foreground cells above threshold)",
           xlim=(0, 1), ylim=(0, 1.02), title="encoder discriminability: IoF-IoB")
    bx.set(xlabel="threshold t", ylabel="fraction above t", xlim=(0, 1), ylim=(0, 1.02),
           title="IoF (solid), IoB (dashed)")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_overlay(panels: Sequence[tuple[str, object]], path: Path) -> None:
    """panels: (label, ImageMap) per checkpoint for one image: the image, its score map as a
    heat map on top (each cell drawn over the pixels it covers) and the gt boxes."""
    from matplotlib.patches import Rectangle

    fig = _figure(figsize=(4.2 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, m) in zip(axes, panels):
        h, w = m.image.shape[:2]
        hm, wm = m.score.shape
        ax.imshow(m.image.numpy(), extent=(0, w, h, 0))
        im = ax.imshow(m.score.numpy(), cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear",
                       extent=(0, wm * m.stride[1], hm * m.stride[0], 0))
        for x1, y1, x2, y2 in m.boxes.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.2))
        ax.set(xlim=(0, w), ylim=(h, 0), title=f"{label} (image {m.image_id})")
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="score")
    fig.savefig(path, dpi=100)
