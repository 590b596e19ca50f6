"""COCO AP of a trained checkpoint on BCCD val without and with test-time augmentation
(horizontal flip, multi-scale; weighted box fusion or box voting), in one process.

    python benchmarks/bccd_tta.py --checkpoint runs/bccd_k2/last.pt
        [--variants none,flip-wbf,flip-vote,ms-wbf,ms-vote] [--out benchmarks/results/bccd_tta.json]

The checkpoint used for the published figures: the K=2 model of
benchmarks/results/bccd_aux_heads_5epochs.json, retrained with its command (see the JSON).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd"
VARIANTS = {
    "none": None,
    # the merge alone on the model's own detections (one view): NMS + voting, or fusion
    "merge-wbf": {"scales": (1.0,), "flip": False, "merge": "wbf"},
    "merge-vote": {"scales": (1.0,), "flip": False, "merge": "vote"},
    "flip-wbf": {"scales": (1.0,), "flip": True, "merge": "wbf"},
    "flip-vote": {"scales": (1.0,), "flip": True, "merge": "vote"},
    "ms-wbf": {"scales": (0.8, 1.0, 1.2), "flip": True, "merge": "wbf"},
    "ms-vote": {"scales": (0.8, 1.0, 1.2), "flip": True, "merge": "vote"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iou", type=float, default=0.55, help="the merges' IoU threshold")
    ap.add_argument("--out", default="benchmarks/results/bccd_tta.json")
    args = ap.parse_args()

    from codetr.engine import evaluate
    from codetr.engine.data import build_dataset
    from codetr.engine.predictor import load_trained
    from codetr.engine.tta import TestTimeAugmentation

    model, ckpt = load_trained(args.checkpoint)
    data = model.config.data
    dataset = build_dataset(data, BCCD / "val.json", BCCD / "images", train=False)
    rows = []
    for name in args.variants.split(","):
        options = VARIANTS[name]
        runner = model if options is None else TestTimeAugmentation(
            model, size_divisibility=data.size_divisibility, iou_threshold=args.iou, **options)
        start = time.perf_counter()
        metrics = evaluate(runner, dataset, torch.device("cpu"), batch_size=2,
                           size_divisibility=data.size_divisibility, progress=True)
        views = 1 if options is None else (1 + options["flip"]) * len(options["scales"])
        rows.append({"variant": name, "views": views,
                     **{k: 100 * metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                     "s_per_image": (time.perf_counter() - start) / len(dataset)})
        print(rows[-1], flush=True)
    print_table(rows, [("variant", "TTA", "s"), ("views", "views", "d"), ("AP", "AP", ".1f"),
                       ("AP50", "AP50", ".1f"), ("AP75", "AP75", ".1f"), ("APs", "APs", ".1f"),
                       ("APm", "APm", ".1f"), ("APl", "APl", ".1f"), ("s_per_image", "s / image", ".2f")])
    write_json(args.out, {"case": f"BCCD val ({len(dataset)} images), {args.checkpoint}, "
                                  f"preset {ckpt['train_config'].get('preset', '?')}, eval batch 2",
                          "variants": {k: v for k, v in VARIANTS.items() if k in args.variants.split(",")},
                          "command": " ".join(["python", *sys.argv]), "environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
