"""Box operators: compiled kernels vs torchvision and vs our pure-PyTorch references.

Cases of ../shared/BENCHMARKS.md (boxes and assignment):
  I1  pairwise IoU and GIoU, 22300 anchors x 50 gts and 267300 anchors x 100 gts
  I2  pairwise GIoU cost of the Hungarian matcher, 300 queries x 20 gts per image, batch 2
      (per-image blocks: boxes1 [2, 300, 4], boxes2 [2, 20, 4])
  G1  aligned GIoU loss forward+backward, 1,000 and 100,000 pairs
  N1  NMS of 4,000 boxes at IoU 0.7 (and batched_nms over 80 classes, N1-batched)
  R1  RoIAlign: in bench_roi_align.py (it needs the multi-level extractor)
Medians of --repeats runs after warm-up; ratios are torchvision (or reference) time over
compiled time, measured side by side in one run. Peak memory of the I1 cases is measured
in fresh processes (--no-memory skips it).

    python benchmarks/bench_box_ops.py [--cases I1,I2,G1,N1] [--repeats 5] [--threads N]
        [--device cpu|cuda] [--no-memory] [--out benchmarks/results/box_ops.json]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment, measure_in_subprocess, peak_memory_mib, print_table, time_side_by_side, write_json,
)

from codetr.ops import (  # noqa: E402
    batched_nms, batched_nms_reference, box_iou, box_iou_reference, generalized_box_iou_loss,
    generalized_box_iou_loss_reference, nms, nms_reference,
)

try:
    import torchvision.ops as tv
except ImportError:  # the project's own references are then the only baseline
    tv = None

IMAGE = (1333, 800)  # (W, H) of an 800x1333 image


def image_boxes(n: int, g: torch.Generator, min_side=8.0, max_side=400.0) -> torch.Tensor:
    """[n, 4] boxes inside an 800x1333 image with sides uniform in [min_side, max_side]."""
    W, H = IMAGE
    wh = torch.rand(n, 2, generator=g) * (max_side - min_side) + min_side
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H]) - wh)
    return torch.cat([xy, xy + wh], 1)


def detections(n: int, g: torch.Generator, classes: int = 1):
    """Pre-NMS detections: boxes jittered around n/10 objects (so that many overlap),
    uniform scores, and a class per box."""
    objects = image_boxes(max(n // 10, 1), g, 16.0, 300.0)
    boxes = objects[torch.randint(0, len(objects), (n,), generator=g)]
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    boxes = boxes + torch.randn(n, 4, generator=g) * 0.1 * side
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


# Each case returns {impl: zero-argument callable} for the compiled op, its reference and
# torchvision (when installed), plus a description; all callables compute the same thing.

def case_iou(N: int, M: int, mode: str, device, batch: tuple = ()):
    g = torch.Generator().manual_seed(0)
    images = math.prod(batch)
    a = image_boxes(images * N, g).view(*batch, N, 4).to(device)
    b = image_boxes(images * M, g).view(*batch, M, 4).to(device)
    impls = {
        "compiled": lambda: box_iou(a, b, mode=mode),
        "reference": lambda: box_iou_reference(a, b, mode=mode),
    }
    if tv is not None:
        fn = tv.box_iou if mode == "iou" else tv.generalized_box_iou
        impls["torchvision"] = lambda: fn(a, b)
    return impls


def case_giou_loss(K: int, device):
    g = torch.Generator().manual_seed(0)
    target = image_boxes(K, g)
    pred = (target + torch.randn(K, 4, generator=g) * 20).to(device).requires_grad_()
    target = target.to(device)

    def fwd_bwd(fn):
        def run():
            fn(pred, target, reduction="sum").backward()
            pred.grad = None
        return run

    impls = {"compiled": fwd_bwd(generalized_box_iou_loss),
             "reference": fwd_bwd(generalized_box_iou_loss_reference)}
    if tv is not None:
        impls["torchvision"] = fwd_bwd(tv.generalized_box_iou_loss)
    return impls


def case_nms(K: int, threshold: float, device, classes: int = 0):
    g = torch.Generator().manual_seed(0)
    boxes, scores, idxs = detections(K, g, max(classes, 1))
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    if classes:
        impls = {"compiled": lambda: batched_nms(boxes, scores, idxs, threshold),
                 "reference": lambda: batched_nms_reference(boxes, scores, idxs, threshold)}
        if tv is not None:
            impls["torchvision"] = lambda: tv.batched_nms(boxes, scores, idxs, threshold)
    else:
        impls = {"compiled": lambda: nms(boxes, scores, threshold),
                 "reference": lambda: nms_reference(boxes, scores, threshold)}
        if tv is not None:
            impls["torchvision"] = lambda: tv.nms(boxes, scores, threshold)
    return impls


# name: (what, size, builder(device) -> {impl: callable}, measure peak memory)
CASES = {
    "I1-iou-22300x50": ("pairwise IoU", "22300 x 50", lambda d: case_iou(22300, 50, "iou", d), True),
    "I1-giou-22300x50": ("pairwise GIoU", "22300 x 50", lambda d: case_iou(22300, 50, "giou", d), True),
    "I1-iou-267300x100": ("pairwise IoU", "267300 x 100", lambda d: case_iou(267300, 100, "iou", d), True),
    "I1-giou-267300x100": ("pairwise GIoU", "267300 x 100", lambda d: case_iou(267300, 100, "giou", d), True),
    "I2": ("matcher GIoU cost", "2 x (300 x 20)", lambda d: case_iou(300, 20, "giou", d, batch=(2,)), False),
    "G1-1000": ("GIoU loss fwd+bwd", "1,000 pairs", lambda d: case_giou_loss(1000, d), False),
    "G1-100000": ("GIoU loss fwd+bwd", "100,000 pairs", lambda d: case_giou_loss(100_000, d), False),
    "N1": ("nms IoU 0.7", "4,000 boxes", lambda d: case_nms(4000, 0.7, d), False),
    "N1-batched": ("batched_nms IoU 0.7", "4,000 boxes, 80 cls", lambda d: case_nms(4000, 0.7, d, 80), False),
}
GROUPS = {"I1": [c for c in CASES if c.startswith("I1-")], "G1": ["G1-1000", "G1-100000"],
          "N1": ["N1", "N1-batched"]}
DEFAULT_CASES = "I1,I2,G1,N1"
IMPLS = ("compiled", "torchvision", "reference")


def probe(case: str, impl: str, device: str) -> None:
    """Peak extra memory of one call, in a fresh process (see common.py)."""
    dev = torch.device(device)
    fn = CASES[case][2](dev)[impl]
    peak = peak_memory_mib(fn, dev)
    print(f'{{"peak_mib": {peak:.1f}}}')


def expand(names: str) -> list[str]:
    out = []
    for name in names.split(","):
        if name == "R1":
            raise SystemExit("R1 (RoIAlign) is measured by benchmarks/bench_roi_align.py")
        out += GROUPS.get(name, [name])
    unknown = [n for n in out if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(CASES)} and groups {list(GROUPS)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="case names or groups I1, G1, N1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); on a loaded machine 1 thread "
                         "avoids OpenMP barriers waiting on descheduled threads")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "box_ops.json"))
    ap.add_argument("--probe", nargs=3, metavar=("CASE", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(*args.probe)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for case in expand(args.cases):
        what, size, build, memory = CASES[case]
        impls = build(device)
        row = {"case": case, "what": what, "size": size}
        times = time_side_by_side({impl: impls[impl] for impl in IMPLS if impl in impls}, device,
                                  args.repeats)
        for impl, seconds in times.items():
            row[f"{impl}_ms"] = 1e3 * seconds
            if memory and not args.no_memory:
                row[f"{impl}_peak_mib"] = measure_in_subprocess(
                    __file__, [case, impl, args.device])["peak_mib"]
        if "torchvision_ms" in row:
            row["vs_torchvision"] = row["torchvision_ms"] / row["compiled_ms"]
        row["vs_reference"] = row["reference_ms"] / row["compiled_ms"]
        rows.append(row)
        print(f"case {case} done", file=sys.stderr, flush=True)

    print(f"\nbox operators on {device} ({torch.get_num_threads()} threads), median of >= {args.repeats} calls and >= 2 s, "
          "side by side")
    columns = [
        ("case", "case", "s"), ("what", "what", "s"), ("size", "size", "s"),
        ("compiled_ms", "ms", ".3f"), ("torchvision_ms", "torchvision ms", ".3f"),
        ("vs_torchvision", "x tv", ".1f"), ("reference_ms", "reference ms", ".3f"),
        ("vs_reference", "x ref", ".1f"),
    ]
    if not args.no_memory:
        columns += [("compiled_peak_mib", "MiB", ".0f"), ("torchvision_peak_mib", "tv MiB", ".0f"),
                    ("reference_peak_mib", "ref MiB", ".0f")]
    print_table(rows, columns)
    write_json(args.out, {"device": str(device), "repeats": args.repeats,
                          "environment": environment(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
