"""Inference latency per image of a preset's inference model (random weights) four ways, timed
side by side (interleaved rounds) in one process: eager with the compiled ops, eager with the
pure-PyTorch references, the ONNX export in onnxruntime, and the torch.export ExportedProgram
(each export made for that image size, as a deployment would).

    python benchmarks/bench_export.py [--preset deformable_detr_pp_r50]
        [--sizes 512x640 800x1333] [--repeats 3] [--out benchmarks/results/export_r50.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, time_side_by_side, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deformable_detr_pp_r50")
    ap.add_argument("--sizes", nargs="+", default=["512x640", "800x1333"], metavar="HxW")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import codetr
    from codetr.config import build_detector
    from codetr.export import ExportedDetector, export_file

    torch.manual_seed(0)
    detector = build_detector(args.preset, 80, **{"backbone.pretrained": False}).eval()
    names = [str(i) for i in range(80)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            H, W = (int(v) for v in size.split("x"))
            images, masks = torch.randn(1, 3, H, W), torch.zeros(1, H, W, dtype=torch.bool)
            runners, export_s = {}, {}
            for fmt, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2")):
                start = time.perf_counter()
                path = export_file(detector, Path(tmp) / f"{H}x{W}{suffix}", fmt, names, (H, W))
                export_s[fmt] = time.perf_counter() - start
                runners[fmt] = ExportedDetector(path)

            def eager(mode):
                def fn():
                    codetr.ops.set_ops_mode(mode)
                    with torch.no_grad():
                        detector(images, masks)
                return fn

            fns = {"eager, compiled ops": eager("compiled"), "eager, reference ops": eager("reference"),
                   "onnxruntime": lambda: runners["onnx"](images, masks),
                   "ExportedProgram": lambda: runners["torch-export"](images, masks)}
            try:
                times = time_side_by_side(fns, torch.device("cpu"), repeats=args.repeats, warmup=1, warmup_s=0.0,
                                          min_time_s=0.0)
            finally:
                codetr.ops.set_ops_mode("auto")
            base = times["eager, compiled ops"]
            for name, t in times.items():
                fmt = {"onnxruntime": "onnx", "ExportedProgram": "torch-export"}.get(name)
                rows.append({"size": f"{H}x{W}", "runtime": name, "s_per_image": t, "vs_eager_compiled": t / base,
                             "export_s": export_s.get(fmt)})
    print(f"{args.preset} inference, random weights, {torch.get_num_threads()} threads")
    print_table(rows, [("size", "size", "s"), ("runtime", "runtime", "s"), ("s_per_image", "s / image", ".2f"),
                       ("vs_eager_compiled", "x eager compiled", ".2f")])
    out = args.out or f"benchmarks/results/export_{args.preset}.json"
    write_json(out, {"case": f"inference latency, {args.preset}, random weights, one image per call; "
                             f"onnxruntime {__import__('onnxruntime').__version__}",
                     "command": " ".join(["python", *sys.argv]), "environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
