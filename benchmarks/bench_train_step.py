"""End to end: one training step (forward + backward + AdamW step) of the CPU preset at
K = 0 (Deformable-DETR++), K = 1 (ATSS) and K = 2 (ATSS + Faster R-CNN), with the compiled
ops and with the pure-PyTorch references; plus inference latency per image, which must not
depend on K (the auxiliary branches are dropped at evaluation).

Input: the first two BCCD training images (../shared/data/bccd) through the preset's eval
transform (short side 512 capped at 640: 480 x 640), with their ground-truth boxes.

Step time: one process per ops kind builds every variant and times their steps round-robin
(K=0, K=1, K=2, K=0, ...), the median of --repeats rounds after --warmup: slow phases of a
shared machine then hit all variants alike, so the ratios to K=0 are stable even when the
absolute times drift (separate processes gave 1.62x and 1.81x for the same code). Memory
and inference latency: each variant in a fresh process, the peak resident set over two
steps (model, optimizer state, activations), the median latency of one image.

    python benchmarks/bench_train_step.py [--heads ",atss,atss+rcnn"] [--ops compiled,reference]
        [--repeats 5] [--out benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_rss_mib, print_table, reset_peak_rss, time_fn, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BCCD = ROOT.parent / "shared" / "data" / "bccd"
PRESET = "co_deformable_detr_lite0"


def make_batch():
    from codetr.config import get_preset
    from codetr.data import collate
    from codetr.engine.data import build_dataset

    ds = build_dataset(get_preset(PRESET).data, BCCD / "train.json", BCCD / "images", train=False)
    return collate([ds[0], ds[1]], size_divisibility=32), ds.num_classes


def make_step(heads: tuple[str, ...], images, masks, targets, num_classes):
    """(model, one training step: forward, backward, clipping, AdamW)."""
    from codetr.config import build_model, param_groups

    torch.manual_seed(0)
    model = build_model(PRESET, num_classes, aux_heads=heads).train()
    opt = torch.optim.AdamW(param_groups(model, model.config.optim), lr=1e-4, weight_decay=1e-4)

    def step():
        loss = sum(model(images, masks, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    return model, step


def probe_memory(heads: tuple[str, ...], repeats: int) -> dict:
    (images, masks, targets), num_classes = make_batch()
    model, step = make_step(heads, images, masks, targets, num_classes)
    step()  # allocates the optimizer state, so the peak below is a steady-state step
    reset_peak_rss()
    step()
    step()
    peak = peak_rss_mib()
    plain = model.inference_model().eval()
    with torch.no_grad():
        infer_s = time_fn(lambda: plain(images[:1], masks[:1]), torch.device("cpu"), repeats=repeats, warmup=1)
    return {"peak_rss_mib": peak, "infer_s_per_image": infer_s,
            "params_train": sum(p.numel() for p in model.parameters()),
            "params_infer": sum(p.numel() for p in plain.parameters())}


def probe_steps(variants: list[tuple[str, ...]], repeats: int, warmup: int) -> list[float]:
    """Median step time of each variant, timed round-robin."""
    (images, masks, targets), num_classes = make_batch()
    steps = [make_step(heads, images, masks, targets, num_classes)[1] for heads in variants]
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for t, step in zip(times, steps):
            t.append(time_fn(step, torch.device("cpu"), repeats=1, warmup=0, warmup_s=0.0,
                              min_time_s=0.0))
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",atss,atss+rcnn", help="comma-separated K variants, heads joined by +")
    ap.add_argument("--ops", default="compiled,reference")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--probe", choices=("memory", "steps"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    parse = lambda v: tuple(h for h in v.split("+") if h)  # noqa: E731
    variants = [parse(v) for v in args.heads.split(",")]
    if args.probe == "memory":
        print(json.dumps(probe_memory(variants[0], args.repeats)))
        return
    if args.probe == "steps":
        print(json.dumps(probe_steps(variants, args.repeats, args.warmup)))
        return
    import subprocess

    def run(ops: str, probe: str, heads: str):
        cmd = [sys.executable, __file__, "--probe", probe, "--heads", heads, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]
        # (No MALLOC_MMAP_THRESHOLD_ as in the op benchmarks: mmap for every allocation
        # doubled the step time here. The peak is the process's resident high-water mark.)
        env = {**os.environ, "CODETR_OPS": ops, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows = []
    for ops in args.ops.split(","):
        step_s = run(ops, "steps", args.heads)
        group = []
        for variant, heads, t in zip(args.heads.split(","), variants, step_s):
            r = {"ops": ops, "aux_heads": "+".join(heads) or "-", "K": len(heads), "step_s": t,
                 **run(ops, "memory", variant)}
            group.append(r)
            r["step_vs_k0"] = r["step_s"] / group[0]["step_s"]
            r["infer_vs_k0"] = r["infer_s_per_image"] / group[0]["infer_s_per_image"]
            print(json.dumps(r), flush=True)
        rows += group
    print_table(rows, [("ops", "ops", "s"), ("K", "K", "d"), ("aux_heads", "heads", "s"),
                       ("step_s", "step s", ".2f"), ("step_vs_k0", "x K=0", ".2f"),
                       ("peak_rss_mib", "peak RSS MiB", ".0f"), ("infer_s_per_image", "infer s/img", ".3f"),
                       ("infer_vs_k0", "x K=0", ".2f")])
    write_json(args.out, {"case": "train step, CPU preset, 2 BCCD images 480x640", "preset": PRESET,
                          "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
