"""Multi-scale deformable attention: compiled kernel vs the grid_sample reference.

Cases A-D of ../shared/BENCHMARKS.md (M=8 heads, D=32, P=4) with sampling that looks like
a trained model, and case A once with uniform-random locations (the worst case for
locality). Reports forward and forward+backward medians, their ratios, and the peak memory
of forward+backward, each measured in a fresh process.

    python benchmarks/bench_ms_deform_attn.py [--cases A,B,C,D,A-uniform] [--repeats 5]
        [--device cpu|cuda] [--out benchmarks/results/ms_deform_attn.json]
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

from codetr.ops import ms_deform_attn, ms_deform_attn_reference  # noqa: E402

LEVELS_800 = [(100, 167), (50, 84), (25, 42), (13, 21)]
CASES = {
    # name: (levels, queries: "encoder" = one per position | int, N, uniform sampling)
    "A": (LEVELS_800, "encoder", 2, False),
    "B": (LEVELS_800, 300, 2, False),
    "C": ([(64, 64), (32, 32), (16, 16), (8, 8)], "encoder", 2, False),
    "D": ([(200, 334)] + LEVELS_800, "encoder", 1, False),
    "A-uniform": (LEVELS_800, "encoder", 2, True),
}
M, D, P = 8, 32, 4
IMPLS = {"compiled": ms_deform_attn, "reference": ms_deform_attn_reference}


def make_inputs(case: str, device: torch.device, seed: int = 0, requires_grad: bool = False):
    """Inputs of a case, sampled as BENCHMARKS.md says: encoder reference points at pixel
    centres of their own level, decoder ones uniform in [0.05, 0.95]^2; offsets uniform in
    [-4, 4] pixels of each level; attention = softmax over L*P of standard normal logits."""
    levels, queries, N, uniform = CASES[case]
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(levels)
    if queries == "encoder":
        refs = []
        for H, W in levels:
            y, x = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
            refs.append(torch.stack([x.flatten() / W, y.flatten() / H], -1))
        ref = torch.cat(refs)  # [S, 2]
    else:
        ref = 0.05 + 0.9 * torch.rand(queries, 2, generator=g)
    Q = ref.shape[0]
    if uniform:
        loc = torch.rand(N, Q, M, L, P, 2, generator=g)
    else:
        wh = shapes.flip(-1).float()  # (W, H) per level
        offsets = (torch.rand(N, Q, M, L, P, 2, generator=g) * 8 - 4) / wh[:, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    attn = torch.randn(N, Q, M, L * P, generator=g).softmax(-1).view(N, Q, M, L, P)
    value = torch.randn(N, S, M, D, generator=g)
    tensors = [t.to(device) for t in (value, shapes, starts, loc, attn)]
    if requires_grad:
        for i in (0, 3, 4):
            tensors[i].requires_grad_()
    return tensors


def run(fn, inputs, backward: bool):
    out = fn(*inputs)
    if backward:
        out.backward(torch.ones_like(out))
        for i in (0, 3, 4):
            inputs[i].grad = None
    return out


def probe(case: str, impl: str, device: str) -> None:
    """Peak extra memory of one forward+backward, in a fresh process (see common.py)."""
    dev = torch.device(device)
    # Warm up on a tiny input first: the first backward initialises autograd machinery and
    # imports modules, memory that is not the op's.
    tiny = make_inputs("C", dev, requires_grad=True)
    tiny = [tiny[0][:1, :], tiny[1], tiny[2], tiny[3][:1, :8], tiny[4][:1, :8]]
    tiny = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tiny]
    run(IMPLS[impl], tiny, backward=True)
    del tiny
    inputs = make_inputs(case, dev, requires_grad=True)
    peak = peak_memory_mib(lambda: run(IMPLS[impl], inputs, backward=True), dev)
    print(f'{{"peak_mib": {peak:.1f}}}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="A,B,C,D,A-uniform")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ms_deform_attn.json"))
    ap.add_argument("--probe", nargs=3, metavar=("CASE", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(*args.probe)

    device = torch.device(args.device)
    rows = []
    for case in args.cases.split(","):
        row = {"case": case}
        inputs = {impl: make_inputs(case, device, requires_grad=True) for impl in IMPLS}
        with torch.no_grad():
            fwd = time_side_by_side({impl: partial(run, fn, inputs[impl], False)
                                     for impl, fn in IMPLS.items()}, device, args.repeats)
        fwdbwd = time_side_by_side({impl: partial(run, fn, inputs[impl], True)
                                    for impl, fn in IMPLS.items()}, device, args.repeats)
        del inputs
        for impl in IMPLS:
            row[f"{impl}_fwd_ms"] = 1e3 * fwd[impl]
            row[f"{impl}_fwdbwd_ms"] = 1e3 * fwdbwd[impl]
            if not args.no_memory:
                row[f"{impl}_peak_mib"] = measure_in_subprocess(
                    __file__, [case, impl, args.device])["peak_mib"]
        row["fwd_speedup"] = row["reference_fwd_ms"] / row["compiled_fwd_ms"]
        row["fwdbwd_speedup"] = row["reference_fwdbwd_ms"] / row["compiled_fwdbwd_ms"]
        if not args.no_memory:
            row["memory_ratio"] = row["compiled_peak_mib"] / max(row["reference_peak_mib"], 1e-6)
        rows.append(row)
        print(f"case {case} done", file=sys.stderr, flush=True)

    print(f"\nms_deform_attn on {device} (M={M}, D={D}, P={P}), median of >= {args.repeats} calls and >= 2 s, "
          "compiled and reference side by side")
    print_table(rows, [
        ("case", "case", "s"),
        ("compiled_fwd_ms", "fwd ms", ".1f"), ("reference_fwd_ms", "ref fwd ms", ".1f"),
        ("fwd_speedup", "fwd x", ".1f"),
        ("compiled_fwdbwd_ms", "f+b ms", ".1f"), ("reference_fwdbwd_ms", "ref f+b ms", ".1f"),
        ("fwdbwd_speedup", "f+b x", ".1f"),
        ("compiled_peak_mib", "f+b MiB", ".0f"), ("reference_peak_mib", "ref MiB", ".0f"),
        ("memory_ratio", "mem ratio", ".3f"),
    ])
    write_json(args.out, {"device": str(device), "repeats": args.repeats,
                          "environment": environment(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
