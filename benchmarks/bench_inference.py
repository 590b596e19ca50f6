"""Inference latency per image of a preset's inference model (random weights) with the
compiled ops and with the pure-PyTorch references, timed side by side (interleaved rounds)
in one process.

Input: a BCCD image (../shared/data/bccd) through the preset's eval transform, or with
--size H W a random image of that size (the r50 presets at 800x1333: the official test
scale).

    python benchmarks/bench_inference.py [--preset deformable_detr_pp_r50] [--size 800 1333]
        [--repeats 3] [--out benchmarks/results/inference_r50_800x1333.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, time_side_by_side, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deformable_detr_pp_r50")
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import codetr
    from codetr.config import build_model

    torch.manual_seed(0)
    model = build_model(args.preset, 80, **{"backbone.pretrained": False}).inference_model().eval()
    H, W = args.size
    images = torch.randn(1, 3, H, W)
    masks = torch.zeros(1, H, W, dtype=torch.bool)

    def run(mode):
        def fn():
            codetr.ops.set_ops_mode(mode)
            with torch.no_grad():
                model(images, masks)
        return fn

    try:
        times = time_side_by_side({"compiled": run("compiled"), "reference": run("reference")}, torch.device("cpu"),
                                  repeats=args.repeats, warmup=1, warmup_s=0.0, min_time_s=0.0)
    finally:
        codetr.ops.set_ops_mode("auto")
    rows = [{"ops": k, "s_per_image": v, "speedup_vs_reference": times["reference"] / v} for k, v in times.items()]
    print(f"{args.preset} inference, {H}x{W}, {torch.get_num_threads()} threads")
    print_table(rows, [("ops", "ops", "s"), ("s_per_image", "s / image", ".2f"),
                       ("speedup_vs_reference", "x reference", ".2f")])
    out = args.out or f"benchmarks/results/inference_{args.preset}_{H}x{W}.json"
    write_json(out, {"case": f"inference, {args.preset}, random weights, one {H}x{W} image",
                     "command": " ".join(["python", *sys.argv]), "environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
