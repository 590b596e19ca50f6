"""Assigners: compiled kernels vs the per-image pure-PyTorch references (mmdetection-style,
building the [A, G] IoU matrix).

Cases (../shared/BENCHMARKS.md):
  T1-G{7,50,200}  atss_assign, 5-level anchors of an 800x1333 image (strides 8..128, one
                  square anchor of side 8 * stride per location: A = 22300), batch 2, G gts
                  per image
  I1-22300x50     max_iou_assign, the T1 anchors and 50 gts per image, batch 2
  I1-267069x100   max_iou_assign, RPN anchors of a 5-level model (strides 4..64, 3 ratios per
                  location: A = 267069, the "267300" of BENCHMARKS.md), 100 gts, batch 2
each max_iou case with the RPN preset (0.7 / 0.3, low-quality matches with min_pos_iou 0.3)
and, suffixed -rcnn, the R-CNN one (0.5 / 0.5, no low-quality matches). Gts are random boxes
inside the image, sides up to 60% of it. Reports medians of the call, their ratio, and the
peak memory of one call, each measured in a fresh process.

    python benchmarks/bench_assign.py [--cases T1-G7,...] [--repeats 5] [--threads N]
        [--device cpu|cuda] [--out benchmarks/results/assign.json]
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment, measure_in_subprocess, peak_memory_mib, print_table, time_side_by_side, write_json,
)

from codetr.ops import (  # noqa: E402
    atss_assign, atss_assign_reference, max_iou_assign, max_iou_assign_reference,
)

H, W = 800, 1333
RPN = (0.7, 0.3, 0.3, True, True)
RCNN = (0.5, 0.5, 0.5, False, True)
CASES = {
    # name: (op, strides, anchors per location (ratios), G, preset)
    "T1-G7": ("atss", (8, 16, 32, 64, 128), (1.0,), 7, None),
    "T1-G50": ("atss", (8, 16, 32, 64, 128), (1.0,), 50, None),
    "T1-G200": ("atss", (8, 16, 32, 64, 128), (1.0,), 200, None),
    "I1-22300x50": ("max_iou", (8, 16, 32, 64, 128), (1.0,), 50, RPN),
    "I1-22300x50-rcnn": ("max_iou", (8, 16, 32, 64, 128), (1.0,), 50, RCNN),
    "I1-267069x100": ("max_iou", (4, 8, 16, 32, 64), (0.5, 1.0, 2.0), 100, RPN),
    "I1-267069x100-rcnn": ("max_iou", (4, 8, 16, 32, 64), (0.5, 1.0, 2.0), 100, RCNN),
}
B = 2
IMPLS = {
    "atss": {"compiled": atss_assign, "reference": atss_assign_reference},
    "max_iou": {"compiled": max_iou_assign, "reference": max_iou_assign_reference},
}


def anchors(strides, ratios, scale=8.0):
    """mmdetection's AnchorGenerator (center_offset 0): side scale * stride per ratio."""
    out, counts = [], []
    for s in strides:
        h, w = -(-H // s), -(-W // s)
        y, x = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack([x.flatten(), y.flatten()], -1)
        half = [torch.tensor([scale * s / r**0.5 / 2, scale * s * r**0.5 / 2]) for r in ratios]
        a = torch.stack([torch.cat([c - hf, c + hf], -1) for hf in half], 1).reshape(-1, 4)
        out.append(a)
        counts.append(a.shape[0])
    return torch.cat(out), counts


def make_inputs(case: str, device: torch.device, seed: int = 0):
    """(fn args as a tuple, op name) of a case."""
    op, strides, ratios, G, preset = CASES[case]
    g = torch.Generator().manual_seed(seed)
    a, levels = anchors(strides, ratios)
    wh = torch.rand(B, G, 2, generator=g) ** 2 * torch.tensor([W * 0.6, H * 0.6]) + 4
    xy = torch.rand(B, G, 2, generator=g) * (torch.tensor([W, H]) - wh)
    gts = torch.cat([xy, xy + wh], -1).to(device)
    counts = torch.full((B,), G, dtype=torch.long, device=device)
    if op == "atss":
        return (a.to(device), levels, gts, counts), op
    return (a.to(device), gts, counts, *preset), op


def probe(case: str, impl: str, device: str) -> None:
    """Peak extra memory of one call, in a fresh process (see common.py)."""
    dev = torch.device(device)
    args, op = make_inputs(case, dev)
    fn = IMPLS[op][impl]
    peak = peak_memory_mib(lambda: fn(*args), dev)
    print(f'{{"peak_mib": {peak:.1f}}}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for both implementations (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "assign.json"))
    ap.add_argument("--probe", nargs=3, metavar=("CASE", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(*args.probe)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for case in args.cases.split(","):
        inputs, op = make_inputs(case, device)
        row = {"case": case, "A": inputs[0].shape[0], "G": inputs[1 if op == "max_iou" else 2].shape[1]}
        outs = {}
        times = time_side_by_side({impl: partial(fn, *inputs) for impl, fn in IMPLS[op].items()},
                                  device, args.repeats)
        for impl, fn in IMPLS[op].items():
            row[f"{impl}_ms"] = 1e3 * times[impl]
            outs[impl] = fn(*inputs)
            if not args.no_memory:
                row[f"{impl}_peak_mib"] = measure_in_subprocess(
                    __file__, [case, impl, args.device])["peak_mib"]
        row["same_result"] = bool(torch.equal(outs["compiled"][0], outs["reference"][0])
                                  and torch.equal(outs["compiled"][1], outs["reference"][1]))
        row["speedup"] = row["reference_ms"] / row["compiled_ms"]
        if not args.no_memory:
            row["memory_ratio"] = row["compiled_peak_mib"] / max(row["reference_peak_mib"], 1e-6)
        rows.append(row)
        print(f"case {case} done", file=sys.stderr, flush=True)

    print(f"\nassigners on {device} ({torch.get_num_threads()} threads), batch {B}, median of "
          f">= {args.repeats} calls and >= 2 s, side by side")
    print_table(rows, [
        ("case", "case", "s"), ("A", "A", "d"), ("G", "G", "d"),
        ("compiled_ms", "ms", ".2f"), ("reference_ms", "ref ms", ".1f"),
        ("speedup", "x", ".1f"),
        ("compiled_peak_mib", "MiB", ".1f"), ("reference_peak_mib", "ref MiB", ".1f"),
        ("memory_ratio", "mem ratio", ".3f"), ("same_result", "same", ""),
    ])
    write_json(args.out, {"device": str(device), "repeats": args.repeats,
                          "environment": environment(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
