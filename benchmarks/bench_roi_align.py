"""RoIAlign: compiled kernel vs torchvision.ops.roi_align vs the pure-PyTorch reference.

Case R1 of ../shared/BENCHMARKS.md: the 4 levels of case A (100x167, 50x84, 25x42, 13x21,
strides 8-64 of an 800x1333 image) with 256 channels, batch 2, 512 RoIs per image, 7x7
bins, aligned, adaptive sampling (Faster R-CNN head settings). Each RoI is pooled from the
level `map_roi_levels` picks (finest_scale 56), one RoIAlign call per level, as
MultiScaleRoIAlign does; only the RoIAlign function differs between the implementations.
R1-L0 pools all 1024 RoIs from the finest level in one call (the op alone, more samples).

RoIs look like proposals: centres uniform in the image, sqrt(area) log-uniform in
[16, 800] pixels, aspect ratio log-uniform in [1/3, 3], clipped to the image.

    python benchmarks/bench_roi_align.py [--cases R1,R1-L0] [--repeats 5]
        [--device cpu|cuda] [--out benchmarks/results/roi_align.json]
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment, measure_in_subprocess, peak_memory_mib, print_table, time_side_by_side, write_json,
)

from codetr.ops import (  # noqa: E402
    map_roi_levels, multiscale_roi_align, roi_align, roi_align_reference,
)

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
STRIDES = [8, 16, 32, 64]
IMAGE = (800, 1333)
C, N, ROIS_PER_IMAGE, OUT = 256, 2, 512, 7
CASES = {"R1": "pyramid", "R1-L0": "finest"}


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align as tv
    except ImportError:
        return None
    return tv


IMPLS = {"compiled": roi_align, "torchvision": _torchvision_roi_align(),
         "reference": roi_align_reference}


def make_inputs(device: torch.device, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(N, C, h, w, generator=g) for h, w in LEVELS]
    K = N * ROIS_PER_IMAGE
    H, W = IMAGE
    size = torch.exp(torch.empty(K).uniform_(math.log(16), math.log(800), generator=g))
    ratio = torch.exp(torch.empty(K).uniform_(-math.log(3), math.log(3), generator=g))
    w, h = size * ratio.sqrt(), size / ratio.sqrt()
    cx, cy = torch.rand(K, generator=g) * W, torch.rand(K, generator=g) * H
    boxes = torch.stack([(cx - w / 2).clamp(0, W), (cy - h / 2).clamp(0, H),
                         (cx + w / 2).clamp(0, W), (cy + h / 2).clamp(0, H)], 1)
    batch = torch.arange(N).repeat_interleave(ROIS_PER_IMAGE).float()
    rois = torch.cat([batch[:, None], boxes], 1).to(device)
    features = [f.to(device).requires_grad_(requires_grad) for f in features]
    return features, rois


def pooled(case: str, fn, features, rois):
    """[K, C, 7, 7]: MultiScaleRoIAlign's forward with `fn` as the RoIAlign (R1), or one
    call on the finest level (R1-L0)."""
    if CASES[case] == "finest":
        return fn(features[0], rois, OUT, 1.0 / STRIDES[0], 0, True)
    return multiscale_roi_align(features, rois, OUT, STRIDES, 0, True, 56.0, roi_align_fn=fn)


def run(case, fn, features, rois, backward: bool):
    out = pooled(case, fn, features, rois)
    if backward:
        out.backward(torch.ones_like(out))
        for f in features:
            f.grad = None
    return out


def probe(case: str, impl: str, device: str) -> None:
    """Peak extra memory of one forward+backward, in a fresh process (see common.py)."""
    dev = torch.device(device)
    features, rois = make_inputs(dev, requires_grad=True)
    peak = peak_memory_mib(lambda: run(case, IMPLS[impl], features, rois, backward=True), dev)
    print(f'{{"peak_mib": {peak:.1f}}}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="R1,R1-L0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "roi_align.json"))
    ap.add_argument("--probe", nargs=3, metavar=("CASE", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(*args.probe)

    device = torch.device(args.device)
    impls = {k: v for k, v in IMPLS.items() if v is not None}
    rows = []
    for case in args.cases.split(","):
        features, rois = make_inputs(device, requires_grad=True)
        row = {"case": case, "rois_per_level": None}
        if CASES[case] == "pyramid":
            counts = torch.bincount(map_roi_levels(rois, len(LEVELS), 56.0), minlength=len(LEVELS))
            row["rois_per_level"] = "/".join(str(int(c)) for c in counts)
        with torch.no_grad():
            fwd = time_side_by_side({impl: partial(run, case, fn, features, rois, False)
                                     for impl, fn in impls.items()}, device, args.repeats)
        fwdbwd = time_side_by_side({impl: partial(run, case, fn, features, rois, True)
                                    for impl, fn in impls.items()}, device, args.repeats)
        for impl in impls:
            row[f"{impl}_fwd_ms"] = 1e3 * fwd[impl]
            row[f"{impl}_fwdbwd_ms"] = 1e3 * fwdbwd[impl]
            if not args.no_memory:
                row[f"{impl}_peak_mib"] = measure_in_subprocess(
                    __file__, [case, impl, args.device])["peak_mib"]
        for other in ("torchvision", "reference"):
            if other in impls:
                for kind in ("fwd", "fwdbwd"):
                    row[f"vs_{other}_{kind}"] = row[f"{other}_{kind}_ms"] / row[f"compiled_{kind}_ms"]
        rows.append(row)
        print(f"case {case} done", file=sys.stderr, flush=True)

    print(f"\nroi_align on {device} (C={C}, N={N}, {ROIS_PER_IMAGE} RoIs/image, {OUT}x{OUT}, "
          f"aligned, adaptive sampling), median of >= {args.repeats} calls and >= 2 s "
          f"side by side; x = other / compiled")
    print_table(rows, [
        ("case", "case", "s"), ("rois_per_level", "RoIs/level", "s"),
        ("compiled_fwd_ms", "fwd ms", ".1f"), ("torchvision_fwd_ms", "tv fwd ms", ".1f"),
        ("vs_torchvision_fwd", "tv x", ".1f"), ("reference_fwd_ms", "ref fwd ms", ".1f"),
        ("vs_reference_fwd", "ref x", ".1f"),
        ("compiled_fwdbwd_ms", "f+b ms", ".1f"), ("torchvision_fwdbwd_ms", "tv f+b ms", ".1f"),
        ("vs_torchvision_fwdbwd", "tv x", ".1f"), ("reference_fwdbwd_ms", "ref f+b ms", ".1f"),
        ("vs_reference_fwdbwd", "ref x", ".1f"),
        ("compiled_peak_mib", "f+b MiB", ".0f"), ("torchvision_peak_mib", "tv MiB", ".0f"),
        ("reference_peak_mib", "ref MiB", ".0f"),
    ])
    write_json(args.out, {"device": str(device), "repeats": args.repeats,
                          "environment": environment(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
