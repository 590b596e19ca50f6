"""The `codetr` command line (also `python -m codetr`)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _env(args: argparse.Namespace) -> int:
    import codetr

    info = codetr.ops.extension_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"codetr {codetr.__version__}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
          f"CUDA device visible: {info['cuda_available']}")
    print(f"compiled extension: {'loaded' if info['extension_loaded'] else 'NOT loaded'}"
          + (f" ({info['load_error']})" if info["load_error"] else ""))
    print(f"CUDA kernels built: {info['cuda_kernels_built']}; CODETR_OPS={info['mode']}")
    width = max(len(op) for op in info["ops"]) if info["ops"] else 2
    print(f"{'op'.ljust(width)}  cpu        cuda")
    for op, entry in info["ops"].items():
        print(f"{op.ljust(width)}  {entry['cpu'].ljust(9)}  {entry['cuda']}")
        for dev in ("cpu", "cuda"):
            if f"{dev}_reason" in entry:
                print(f"{''.ljust(width)}    {dev}: {entry[f'{dev}_reason']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"codetr bench: benchmark scripts not found at {root} (run from a source checkout)",
              file=sys.stderr)
        return 2
    scripts = sorted(root.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    status = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        status |= subprocess.call([sys.executable, str(script), *args.extra])
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codetr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="report torch/CUDA versions and which path each op uses")
    p.add_argument("--json", action="store_true", help="print extension_info() as JSON")
    p.set_defaults(func=_env)
    p = sub.add_parser("bench", help="run the benchmark scripts in benchmarks/")
    p.add_argument("--only", help="run only scripts whose name contains this")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to each script")
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
