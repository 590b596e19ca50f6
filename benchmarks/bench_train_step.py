"""End to end: one training step (forward + backward + AdamW step) of the CPU preset at
K = 0 (Deformable-DETR++), K = 1 (ATSS) and K = 2 (ATSS + Faster R-CNN), with the compiled
ops and with the pure-PyTorch references; plus inference latency per image, which must not
depend on K (the auxiliary branches are dropped at evaluation).

Input: the first two BCCD training images (../shared/data/bccd) through the preset's eval
transform (short side 512 capped at 640: 480 x 640), with their ground-truth boxes. Each
variant runs in a fresh process; the time is the median of --repeats steps after --warmup,
the memory the peak resident set of the process over those steps (model, optimizer state,
activations).

    python benchmarks/bench_train_step.py [--heads ",atss,atss+rcnn"] [--ops compiled,reference]
        [--repeats 3] [--out benchmarks/results/train_step.json]
"""
from __future__ import annotations

import argparse
import json
import os
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


def probe(heads: tuple[str, ...], repeats: int, warmup: int) -> dict:
    from codetr.config import build_model, param_groups

    torch.manual_seed(0)
    (images, masks, targets), num_classes = make_batch()
    model = build_model(PRESET, num_classes, aux_heads=heads).train()
    opt = torch.optim.AdamW(param_groups(model, model.config.optim), lr=1e-4, weight_decay=1e-4)

    def step():
        loss = sum(model(images, masks, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    step()  # allocates the optimizer state, so the peak below is a steady-state step
    reset_peak_rss()
    step_s = time_fn(step, torch.device("cpu"), repeats=repeats, warmup=warmup - 1)
    peak = peak_rss_mib()
    plain = model.inference_model().eval()
    with torch.no_grad():
        infer_s = time_fn(lambda: plain(images[:1], masks[:1]), torch.device("cpu"), repeats=repeats, warmup=1)
    return {"step_s": step_s, "peak_rss_mib": peak, "infer_s_per_image": infer_s,
            "params_train": sum(p.numel() for p in model.parameters()),
            "params_infer": sum(p.numel() for p in plain.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",atss,atss+rcnn", help="comma-separated K variants, heads joined by +")
    ap.add_argument("--ops", default="compiled,reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-heads", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        heads = tuple(h for h in args.probe_heads.split("+") if h)
        print(json.dumps(probe(heads, args.repeats, args.warmup)))
        return
    import subprocess

    rows = []
    for ops in args.ops.split(","):
        base = None
        for variant in args.heads.split(","):
            cmd = [sys.executable, __file__, "--probe", "--probe-heads", variant, "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup)]
            # (No MALLOC_MMAP_THRESHOLD_ as in the op benchmarks: mmap for every allocation
            # doubled the step time here. The peak is the process's resident high-water mark.)
            env = {**os.environ, "CODETR_OPS": ops, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            heads = tuple(h for h in variant.split("+") if h)
            r.update(ops=ops, aux_heads="+".join(heads) or "-", K=len(heads))
            base = base or r
            r["step_vs_k0"] = r["step_s"] / base["step_s"]
            r["infer_vs_k0"] = r["infer_s_per_image"] / base["infer_s_per_image"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    print_table(rows, [("ops", "ops", "s"), ("K", "K", "d"), ("aux_heads", "heads", "s"),
                       ("step_s", "step s", ".2f"), ("step_vs_k0", "x K=0", ".2f"),
                       ("peak_rss_mib", "peak RSS MiB", ".0f"), ("infer_s_per_image", "infer s/img", ".3f"),
                       ("infer_vs_k0", "x K=0", ".2f")])
    write_json(args.out, {"case": "train step, CPU preset, 2 BCCD images 480x640", "preset": PRESET,
                          "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
