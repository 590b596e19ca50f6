"""Whole model on the CPU: our r50 Deformable-DETR++ (K=0) against Hugging Face
transformers' DeformableDetr (two-stage, box refinement, ResNet-50, 300 queries, FFN 2048:
the same parameter count, 47.5M), both with random weights: inference per image and a training step, timed side by side (interleaved
rounds) in one process, and the training step's peak memory, each model in a fresh process.

transformers is a benchmark-only dependency (pip install transformers): without it the
script says so and exits 0. The compute floor reported is the encoder's and decoder's dense
layers' FLOPs (the six encoder FFNs alone are ~250 GFLOP at 800 x 1216) over the
machine's measured matmul rate.

    python benchmarks/bench_vs_transformers.py [--sizes 800x1216,512x640] [--repeats 3]
        [--skip-train] [--out benchmarks/results/vs_transformers.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment, measure_in_subprocess, peak_rss_mib, print_table, reset_peak_rss,
    time_side_by_side, write_json,
)

PRESET = "deformable_detr_pp_r50"
NUM_CLASSES = 80


def hf_model():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        two_stage=True, with_box_refine=True, num_queries=300, num_labels=NUM_CLASSES,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048)  # Co-DETR's FFN width, as our preset
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(config)


def our_model():
    from codetr.config import build_model

    torch.manual_seed(0)
    return build_model(PRESET, NUM_CLASSES, **{"backbone.pretrained": False}).detector


def batch(size: tuple[int, int], n: int, boxes: int = 10):
    """n random images and `boxes` random gts each: ours (images, masks, targets) and the
    transformers model's (pixel_values, pixel_mask, labels)."""
    g = torch.Generator().manual_seed(1)
    H, W = size
    images = torch.randn(n, 3, H, W, generator=g)
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    targets, labels = [], []
    for _ in range(n):
        cxcywh = torch.cat([torch.rand(boxes, 2, generator=g) * 0.6 + 0.2,
                            torch.rand(boxes, 2, generator=g) * 0.3 + 0.05], 1)
        classes = torch.randint(0, NUM_CLASSES, (boxes,), generator=g)
        xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        targets.append({"boxes": xyxy * torch.tensor([W, H, W, H]), "labels": classes})
        labels.append({"boxes": cxcywh, "class_labels": classes})
    return (images, masks, targets), (images, ~masks, labels)


MODELS = {"codetr": our_model, "transformers": hf_model}


def train_steps(names=tuple(MODELS)):
    """{name: one training step (forward, backward, AdamW)}, batch 2 at 512 x 640 with 10
    boxes per image."""
    models = {name: MODELS[name]() for name in names}
    (images, masks, targets), (pixels, pixel_mask, labels) = batch((512, 640), 2)
    steps = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if name == "transformers":
            def loss(m=model):
                return m(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
        else:
            def loss(m=model):
                return sum(m(images, masks, targets).values())

        def step(loss=loss, opt=opt):
            value = loss()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()

        steps[name] = step
    return steps


def probe(which: str) -> dict:
    step = train_steps((which,))[which]
    step()  # the optimizer state
    reset_peak_rss()
    step()
    return {"peak_rss_mib": peak_rss_mib()}


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def dense_gflop(model, images, masks) -> float:
    """FLOPs of the model's matmuls and convolutions in one forward, counted by
    torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    # The counter's module tracker hooks tensors that require grad: count without any.
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            model(images, masks)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return counter.get_total_flops() / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="800x1216,512x640")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--probe", choices=list(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/vs_transformers.json")
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install transformers): nothing to compare with")
        return 0
    if args.probe:
        import json

        print(json.dumps(probe(args.probe)))
        return 0
    cpu = torch.device("cpu")
    ours, theirs = our_model().eval(), hf_model().eval()
    params = {"codetr": sum(p.numel() for p in ours.parameters()),
              "transformers": sum(p.numel() for p in theirs.parameters())}
    rate = matmul_gflops()
    rows = []
    for size in args.sizes.split(","):
        H, W = map(int, size.split("x"))
        (images, masks, _), (pixels, pixel_mask, _) = batch((H, W), 1)

        def infer_ours():
            with torch.no_grad():
                ours(images, masks)

        def infer_theirs():
            with torch.no_grad():
                theirs(pixel_values=pixels, pixel_mask=pixel_mask)

        t = time_side_by_side({"codetr": infer_ours, "transformers": infer_theirs}, cpu,
                              repeats=args.repeats, warmup=1, warmup_s=0.0, min_time_s=0.0)
        floor_s = dense_gflop(ours, images, masks) / rate
        rows.append({"case": f"inference {H}x{W}", "codetr_s": t["codetr"],
                     "transformers_s": t["transformers"], "speedup": t["transformers"] / t["codetr"],
                     "floor_s": floor_s, "floor_fraction": floor_s / t["codetr"]})
    if not args.skip_train:
        t = time_side_by_side(train_steps(), cpu, repeats=args.repeats, warmup=1, warmup_s=0.0,
                              min_time_s=0.0)
        mem = {k: measure_in_subprocess(__file__, [k])["peak_rss_mib"] for k in t}
        rows.append({"case": "train step 2x512x640", "codetr_s": t["codetr"],
                     "transformers_s": t["transformers"], "speedup": t["transformers"] / t["codetr"],
                     "codetr_peak_mib": mem["codetr"], "transformers_peak_mib": mem["transformers"],
                     "memory_ratio": mem["codetr"] / mem["transformers"]})
    print(f"{PRESET} (K=0) vs transformers {transformers.__version__} DeformableDetr, "
          f"{torch.get_num_threads()} threads; parameters {params}; matmul {rate:.0f} GFLOP/s")
    print_table(rows, [("case", "case", "s"), ("codetr_s", "codetr s", ".2f"),
                       ("transformers_s", "transformers s", ".2f"), ("speedup", "x", ".2f"),
                       ("floor_fraction", "floor fraction", ".2f"),
                       ("memory_ratio", "memory ratio", ".2f")])
    write_json(args.out, {"command": " ".join(["python", *sys.argv]), "environment": environment(),
                          "transformers": transformers.__version__, "parameters": params,
                          "matmul_gflops": rate, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
