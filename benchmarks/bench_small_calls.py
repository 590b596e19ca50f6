"""Small ms_deform_attn calls, on a quiet machine and under a competing load: compiled vs
the grid_sample reference, per-call latency (median and 90th percentile).

A decoder's calls (hundreds of queries) and the tiny ones of a gradcheck are where a
kernel's thread handling shows: a call that hands two threads its work waits for both, and
on a loaded machine the second one may not be scheduled for milliseconds. The load is two
processes spinning on the CPU (as many as our machine has cores).

    python benchmarks/bench_small_calls.py [--label after] [--seconds 3]
        [--out benchmarks/results/small_calls.json]
    python benchmarks/bench_small_calls.py --grain-sweep   # how the kernel's grains were chosen

`--label` names this run's section in the output file (other sections are kept), so that
one file holds a "before" and an "after" of a kernel change.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from codetr.ops import ms_deform_attn, ms_deform_attn_reference  # noqa: E402

DECODER_LEVELS = [(64, 80), (32, 40), (16, 20), (8, 10)]  # a 512 x 640 image
CASES = {
    # name: (levels, N, Q, M, D, P, dtype)
    "gradcheck-f64": ([(3, 4), (2, 2)], 1, 2, 2, 3, 2, torch.float64),
    "decoder-Q10": (DECODER_LEVELS, 1, 10, 8, 32, 4, torch.float32),
    "decoder-Q100": (DECODER_LEVELS, 1, 100, 8, 32, 4, torch.float32),
    "decoder-Q300x2": (DECODER_LEVELS, 2, 300, 8, 32, 4, torch.float32),
}
IMPLS = {"compiled": ms_deform_attn, "reference": ms_deform_attn_reference}


def make_inputs(levels, N, Q, M, D, P, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(levels)
    sizes = shapes.prod(1)
    starts = sizes.cumsum(0) - sizes
    value = torch.randn(N, int(sizes.sum()), M, D, generator=g, dtype=dtype, requires_grad=True)
    loc = torch.rand(N, Q, M, len(levels), P, 2, generator=g, dtype=dtype, requires_grad=True)
    attn = torch.rand(N, Q, M, len(levels), P, generator=g, dtype=dtype, requires_grad=True)
    return value, shapes, starts, loc, attn


def latencies(calls: dict, seconds: float, block_s: float = 0.05) -> dict[str, list[float]]:
    """Runs the calls in turn, each for `block_s` at a time, for `seconds` in all (after a
    warm-up): every call sees the same machine states, and a block is long enough for its
    own cache and thread state (call by call, each side ran in the other's wake)."""
    for fn in calls.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in calls}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(map(len, times.values())) < 5:
        for name, fn in calls.items():
            block_end = time.perf_counter() + block_s
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                times[name].append(t1 - t0)
                if t1 >= block_end:
                    break
    return times


def summary(t: list[float]) -> dict:
    t = sorted(t)
    return {"median_us": round(statistics.median(t) * 1e6, 1),
            "p90_us": round(t[int(0.9 * (len(t) - 1))] * 1e6, 1), "calls": len(t)}


def run(seconds: float) -> dict:
    results = {}
    for name, spec in CASES.items():
        inputs = make_inputs(*spec)
        value, shapes, starts, loc, attn = inputs
        grad = torch.ones(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                          dtype=value.dtype)
        calls = {}
        for impl, fn in IMPLS.items():
            def forward(fn=fn):
                with torch.no_grad():
                    fn(*inputs)

            def forward_backward(fn=fn):
                torch.autograd.grad(fn(*inputs), (value, loc, attn), grad)

            calls[f"{impl}/forward"] = forward
            calls[f"{impl}/forward+backward"] = forward_backward
        times = latencies(calls, seconds)
        results[name] = {k: summary(v) for k, v in times.items()}
        for k, v in results[name].items():
            print(f"  {name:16s} {k:28s} median {v['median_us']:9.1f} us  p90 {v['p90_us']:9.1f} us")
    # A whole float64 gradcheck (tests/ops/test_ms_deform_attn.py's): thousands of tiny calls.
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3), (1, 1)], 2, 3, 2, 3, 2, torch.float64)
    loc = (loc.detach() * 0.9 + 0.013).requires_grad_()
    seconds_per = {impl: [] for impl in IMPLS}
    for _ in range(3):
        for impl, fn in IMPLS.items():
            t0 = time.perf_counter()
            torch.autograd.gradcheck(lambda v, l, a: fn(v, shapes, starts, l, a), (value, loc, attn))
            seconds_per[impl].append(time.perf_counter() - t0)
    results["gradcheck"] = {impl: {"median_s": round(statistics.median(t), 3)}
                            for impl, t in seconds_per.items()}
    print(f"  gradcheck        " + "  ".join(f"{k} {v['median_s']:.3f} s" for k, v in results["gradcheck"].items()))
    return results


SWEEP_Q = (1, 4, 16, 32, 64, 128, 256, 512, 1024)
SWEEP_ENCODER = [(10, 12), (5, 6), (3, 3), (2, 2)]  # a tiny encoder: one query per position


def work_units(levels, N, Q, M, D, P) -> float:
    """The kernel's measure of a call's work (work_units in ms_deform_attn_cpu.cpp)."""
    S = sum(h * w for h, w in levels)
    L = len(levels)
    padded = Q * L * P >= S
    positions = sum((h + 2) * (w + 2) for h, w in levels) if padded else 0
    return N * M * (Q * L * P * D + positions * D)


def probe_grain(seconds: float) -> list[dict]:
    """Forward and backward median per sweep size, with this process's CODETR_MSDA_GRAIN."""
    rows = []
    specs = [(DECODER_LEVELS, q) for q in SWEEP_Q] + [(SWEEP_ENCODER, sum(h * w for h, w in SWEEP_ENCODER))]
    for levels, Q in specs:
        inputs = make_inputs(levels, 1, Q, 8, 32, 4, torch.float32)
        value, _, _, loc, attn = inputs
        grad = torch.ones(1, Q, 8 * 32)
        out = ms_deform_attn(*inputs)

        def forward():
            with torch.no_grad():
                ms_deform_attn(*inputs)

        def backward():
            torch.ops.codetr.ms_deform_attn_backward(grad, *[t.detach() for t in inputs])

        t = latencies({"forward": forward, "backward": backward}, seconds)
        rows.append({"levels": "decoder" if levels is DECODER_LEVELS else "encoder", "Q": Q,
                     "work_units": work_units(levels, 1, Q, 8, 32, 4),
                     "forward_us": summary(t["forward"])["median_us"],
                     "backward_us": summary(t["backward"])["median_us"]})
        del out
    return rows


def grain_sweep(seconds: float) -> dict:
    """Inline (one thread) against two threads at every sweep size, each in a fresh process
    with the grains overridden: the grain is where two threads start to win."""
    runs = {}
    for name, grain in (("inline", "1e30,1e30"), ("two_threads", "0,0")):
        env = {**os.environ, "CODETR_MSDA_GRAIN": grain}
        out = subprocess.run([sys.executable, __file__, "--probe-grain", "--seconds", str(seconds)],
                             env=env, capture_output=True, text=True, check=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for a, b in zip(runs["inline"], runs["two_threads"]):
        row = {k: a[k] for k in ("levels", "Q", "work_units")}
        for k in ("forward_us", "backward_us"):
            row[f"{k[:-3]}_inline_us"], row[f"{k[:-3]}_2threads_us"] = a[k], b[k]
            row[f"{k[:-3]}_speedup"] = round(a[k] / b[k], 2)
        rows.append(row)
        print(f"  {row['levels']:8s} Q {row['Q']:5d} work {row['work_units']:10.3g}  forward "
              f"{row['forward_inline_us']:8.1f} / {row['forward_2threads_us']:8.1f} us "
              f"(x{row['forward_speedup']})  backward {row['backward_inline_us']:8.1f} / "
              f"{row['backward_2threads_us']:8.1f} us (x{row['backward_speedup']})")
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="after")
    ap.add_argument("--seconds", type=float, default=3.0, help="per case and condition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/small_calls.json")
    ap.add_argument("--grain-sweep", action="store_true")
    ap.add_argument("--probe-grain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe_grain:
        print(json.dumps(probe_grain(args.seconds)))
        return
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    if args.grain_sweep:
        print(f"grain sweep, quiet machine: inline / {args.threads} threads")
        data["grain_sweep"] = {"environment": environment(), **grain_sweep(args.seconds)}
        out.write_text(json.dumps(data, indent=1) + "\n")
        return
    section = {"threads": args.threads, "environment": environment()}
    print(f"quiet machine, {args.threads} threads")
    section["quiet"] = run(args.seconds)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        print(f"under load: {len(burners)} spinning processes")
        section["loaded"] = run(args.seconds)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    data[args.label] = section
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} [{args.label}]")


if __name__ == "__main__":
    main()
