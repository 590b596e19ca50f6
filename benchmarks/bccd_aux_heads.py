"""The paper's claim on our data: the CPU preset trained on BCCD (train split) as K=0
(Deformable-DETR++), K=1 (ATSS) and K=2 (ATSS + Faster R-CNN) with the same budget, then
evaluated on the val split. Each run is the CLI command printed below; this script runs
them one after another (or, with --collect, only reads finished runs) and writes the table.

    python benchmarks/bccd_aux_heads.py [--epochs 6 | --iters 300] [--variants k0,k1,k2]
        [--record-instability 50] [--runs runs] [--collect] [--out PATH]

The table goes to --out, by default benchmarks/results/bccd_aux_heads_<budget>.json (e.g.
bccd_aux_heads_5epochs.json).

--print-commands prints the runs' commands (to run them in parallel by hand, one thread each),
then --collect writes the table from their logs. --record-instability N makes each run record
the matching instability on N training images per epoch (issue 7's curves).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BCCD = ROOT.parent / "shared" / "data" / "bccd"
VARIANTS = {"k0": "", "k1": "atss", "k2": "atss,rcnn"}


def command(name: str, heads: str, budget: list[str], runs: Path) -> list[str]:
    return ["codetr", "train", "--preset", "co_deformable_detr_lite0", "--aux-heads", heads,
            "--train-json", str(BCCD / "train.json"), "--train-images", str(BCCD / "images"),
            "--val-json", str(BCCD / "val.json"), "--val-images", str(BCCD / "images"),
            *budget, "--eval-every", "0", "--workers", "1", "--out", str(runs / f"bccd_{name}")]


def collect(name: str, heads: str, run: Path, cmd: list[str]) -> dict:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    if not evals:
        raise SystemExit(f"{run}: no evaluation in log.jsonl (run not finished?)")
    times = [r["time_per_iter"] for r in records if "time_per_iter" in r][1:]
    last = [r for r in records if "loss" in r][-1]
    return {"variant": name, "aux_heads": heads or "-", "K": len([h for h in heads.split(",") if h]),
            "iters": last["iter"], **{k: v for k, v in evals[-1].items()},
            "s_per_iter": sum(times) / max(len(times), 1), "command": shlex.join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=int, default=300)
    budget.add_argument("--epochs", type=int)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {','.join(VARIANTS)}")
    ap.add_argument("--record-instability", type=int, default=0, metavar="N")
    ap.add_argument("--print-commands", action="store_true")
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--collect", action="store_true", help="only read finished runs")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--out", help="default: benchmarks/results/bccd_aux_heads_<budget>.json")
    args = ap.parse_args()
    runs = Path(args.runs)
    budget = ["--epochs", str(args.epochs)] if args.epochs else ["--iters", str(args.iters)]
    label = f"{args.epochs}epochs" if args.epochs else f"{args.iters}iters"
    out = args.out or ROOT / "benchmarks" / "results" / f"bccd_aux_heads_{label}.json"
    budget += ["--record-instability", str(args.record_instability)] if args.record_instability else []
    names = args.variants.split(",")
    if set(names) - set(VARIANTS):
        raise SystemExit(f"--variants: expected some of {','.join(VARIANTS)}, got {args.variants!r}")
    rows = []
    for name in names:
        heads = VARIANTS[name]
        cmd = command(name, heads, budget, runs)
        if args.print_commands:
            print(shlex.join(cmd))
            continue
        if not args.collect:
            print("$", shlex.join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "codetr", *cmd[1:]], check=True)
        rows.append(collect(name, heads, runs / f"bccd_{name}", cmd))
    if args.print_commands:
        return
    print(f"{'K':>2} {'heads':<10} {'AP':>5} {'AP50':>5} {'AP75':>5} {'APs':>5} {'APm':>5} {'APl':>5} {'s/iter':>7}")
    fmt = lambda v: "    -" if v < 0 else f"{100 * v:5.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['K']:>2} {r['aux_heads']:<10} " + " ".join(fmt(r[k]) for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                                              "APl")) + f" {r['s_per_iter']:7.2f}")
        print("   per class AP:", {k: round(100 * v, 1) for k, v in r["per_class"].items()})
    write_json(out, {"dataset": "BCCD train (205 images) -> val (87 images)",
                          "preset": "co_deformable_detr_lite0", "note": args.note, "rows": rows})


if __name__ == "__main__":
    main()
