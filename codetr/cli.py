"""The `codetr` command line (also `python -m codetr`)."""
from __future__ import annotations

import argparse
import ast
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


class UserError(Exception):
    """A mistake in the command's input: printed without a traceback, exit status 2."""


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from codetr.config import PRESETS, apply_overrides, get_preset
    from codetr.engine import TrainConfig, Trainer

    if args.preset not in PRESETS:
        raise UserError(f"--preset: unknown preset {args.preset!r}; available: {', '.join(sorted(PRESETS))}")
    _need_files(train_json=args.train_json, val_json=args.val_json, pretrained=args.pretrained)
    _need_dirs(train_images=args.train_images, val_images=args.val_images)
    heads = None if args.aux_heads is None else tuple(h for h in args.aux_heads.split(",") if h)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a plain string, e.g. backbone.kind=resnet50
    try:
        apply_overrides(get_preset(args.preset), overrides)
    except KeyError as e:
        raise UserError(f"--set: {e.args[0]}") from e
    cfg = TrainConfig(train_json=args.train_json, train_images=args.train_images, out_dir=args.out,
                      preset=args.preset, val_json=args.val_json, val_images=args.val_images, aux_heads=heads,
                      overrides=overrides,
                      epochs=args.epochs, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                      schedule=args.schedule, warmup_iters=args.warmup_iters, grad_accum=args.grad_accum,
                      amp=args.amp, ema_decay=args.ema, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, num_workers=args.workers, seed=args.seed,
                      resume=args.resume, device=args.device, pretrained=args.pretrained,
                      tensorboard=args.tensorboard)
    if args.record_instability < 0:
        raise UserError(f"--record-instability: expected a number of images >= 0, got {args.record_instability}")
    callbacks = []
    if args.record_instability:
        from codetr.analysis import MatchingInstability

        callbacks.append(MatchingInstability(num_images=args.record_instability))
    trainer = Trainer(cfg, callbacks=callbacks)  # under torchrun it joins the process group (see engine.trainer)
    metrics = trainer.train()
    if metrics and trainer.rank == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "per_class"}))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _tta_options(args: argparse.Namespace):
    """--tta / --tta-scales / --tta-merge -> TestTimeAugmentation options, or None."""
    if not args.tta:
        return None
    try:
        scales = tuple(float(v) for v in args.tta_scales.split(","))
    except ValueError:
        raise UserError(f"--tta-scales: expected comma-separated factors such as 0.8,1,1.2, got {args.tta_scales!r}")
    return {"scales": scales, "flip": True, "merge": args.tta_merge}


def _load_predictor(args: argparse.Namespace, **kw):
    from codetr.engine.predictor import Predictor

    _need_files(checkpoint=args.checkpoint)
    try:
        return Predictor.from_checkpoint(args.checkpoint, args.device, tta=_tta_options(args), **kw)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--checkpoint: {e}") from e


def _eval(args: argparse.Namespace) -> int:
    import torch

    from codetr.engine import evaluate
    from codetr.engine.data import build_dataset
    from codetr.evaluation import CocoEvaluator

    _need_files(json=args.json)
    _need_dirs(images=args.images)
    predictor = _load_predictor(args)
    dataset = build_dataset(predictor.config.data, args.json, args.images, train=False)
    if dataset.class_names != predictor.class_names:
        raise UserError(f"--json: classes {dataset.class_names} differ from the checkpoint's "
                        f"{predictor.class_names}")
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat_id)
    evaluate(predictor.model, dataset, torch.device(args.device), batch_size=args.batch_size,
             size_divisibility=predictor.size_divisibility, evaluator=evaluator, progress=True)
    print(evaluator.format_table())
    if args.results:
        evaluator.write_results(args.results)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from codetr.engine.predictor import draw_detections

    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {args.batch_size}")
    paths = []
    for item in map(Path, args.images):
        if item.is_dir():
            found = sorted(f for f in item.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            paths += found
        else:
            _need_files(image=item)
            paths.append(item)
    predictor = _load_predictor(args, min_score=args.min_score, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for path, det in zip(paths, predictor.predict_iter(paths, progress=len(paths) > 1)):
            records = [{"box_xyxy": b, "score": s, "label": lab, "class_name": n} for b, s, lab, n in
                       zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                           det["class_names"])]
            (out / f"{path.stem}.json").write_text(json.dumps({"image": str(path), "detections": records},
                                                              indent=1))
            draw_detections(predictor.load_image(path), det).save(out / f"{path.stem}.png")
            if len(paths) == 1:
                print(f"{path}: {len(records)} detections -> {out / (path.stem + '.png')}")
    except ValueError as e:  # undecodable image
        raise UserError(str(e)) from e
    if len(paths) > 1:
        print(f"{len(paths)} images -> {out} (one .json and one .png each)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from codetr.engine.predictor import load_trained
    from codetr.export import MIN_SIDE, export_file

    _need_files(checkpoint=args.checkpoint)
    try:
        model, ckpt = load_trained(args.checkpoint)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--checkpoint: {e}") from e
    if args.image_size:
        try:
            h, w = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            raise UserError(f"--image-size: expected HxW such as 512x640, got {args.image_size!r}")
    else:  # the largest eval input: the long side capped at max_size, either orientation
        d = max(model.config.data.size_divisibility, 1)
        h = w = -(-model.config.data.max_size // d) * d
    if min(h, w) < MIN_SIDE:
        raise UserError(f"--image-size: both sides must be >= {MIN_SIDE}, got {h}x{w}")
    suffix = {"onnx": ".onnx", "torch-export": ".pt2"}[args.format]
    if Path(args.out).suffix != suffix:
        raise UserError(f"--out: a {args.format} file must end in {suffix} (how codetr predict/eval tell them apart), "
                        f"got {args.out}")
    path = export_file(model, args.out, args.format, list(ckpt["class_names"]), (h, w), args.dynamic)
    size = "any size (dynamic)" if args.dynamic else f"padded size {h}x{w}"
    print(f"{args.format}: {path} ({path.stat().st_size / 2**20:.1f} MiB; inputs images [B, 3, H, W] float32, "
          f"image_sizes [B, 2], orig_sizes [B, 2] int64; {size})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from codetr.convert import convert_file

    _need_files(src=args.src)
    names = None
    if args.class_names_from:
        _need_files(class_names_from=args.class_names_from)
        cats = json.loads(Path(args.class_names_from).read_text()).get("categories", [])
        names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
        if args.num_classes is None:
            args.num_classes = len(names)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num-classes: expected >= 1, got {args.num_classes}")
    try:
        report = convert_file(args.src, args.dst, source=args.source, target=args.target, preset=args.preset,
                              inference=args.inference, num_classes=args.num_classes, class_names=names)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{args.src}: {e}") from e
    print(report.summary())
    print(f"wrote {args.dst}")
    return 0


def _labels(labels, paths, what: str):
    if labels is None:
        return None
    if len(labels) != len(paths):
        raise UserError(f"--labels: {len(labels)} labels for {len(paths)} {what}")
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: labels must be distinct, got {labels}")
    return labels


def _analyze_instability(args: argparse.Namespace) -> int:
    from codetr.analysis.plots import MissingMatplotlib
    from codetr.analysis.reports import instability_report

    for run in args.run_dirs:
        if not Path(run).is_dir():
            raise UserError(f"RUN_DIR: folder not found: {run}")
    labels = _labels(args.labels, args.run_dirs, "runs")
    try:
        png = instability_report([Path(r) for r in args.run_dirs], Path(args.out), labels)
    except MissingMatplotlib as e:
        raise UserError(str(e)) from e
    print(f"instability: {png} and {png.with_suffix('.csv')}")
    return 0


def _analyze_discriminability(args: argparse.Namespace) -> int:
    from codetr.analysis.plots import MissingMatplotlib
    from codetr.analysis.reports import discriminability_report

    for c in args.checkpoint:
        _need_files(checkpoint=c)
    _need_files(json=args.json)
    _need_dirs(images=args.images)
    if args.num_images < 1:
        raise UserError(f"--num-images: expected >= 1, got {args.num_images}")
    labels = _labels(args.labels, args.checkpoint, "checkpoints")
    if labels is None and len(set(args.checkpoint)) != len(args.checkpoint):
        raise UserError("--checkpoint: the same checkpoint is given twice")
    try:
        summary = discriminability_report([Path(c) for c in args.checkpoint], Path(args.json), Path(args.images),
                                          Path(args.out), args.num_images, args.num_overlays, labels, args.device)
    except MissingMatplotlib as e:
        raise UserError(str(e)) from e
    except ValueError as e:  # not a codetr checkpoint, malformed json
        raise UserError(str(e)) from e
    for label, s in summary.items():
        print(f"{label}: area under IoF(IoB) {s['auc']:.3f} over {s['images']} images "
              f"({100 * s['foreground_fraction']:.1f}% foreground cells)")
    print(f"curves: {Path(args.out) / 'curves.csv'}, {Path(args.out) / 'curves.png'}")
    return 0


def _need_files(**paths) -> None:
    for name, p in paths.items():
        if p is not None and not Path(p).is_file():
            raise UserError(f"--{name.replace('_', '-')}: file not found: {p}")


def _need_dirs(**paths) -> None:
    for name, p in paths.items():
        if p is not None and not Path(p).is_dir():
            raise UserError(f"--{name.replace('_', '-')}: folder not found: {p}")


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

    p = sub.add_parser("train", help="train a detector on a COCO-format dataset")
    p.add_argument("--preset", default="co_deformable_detr_lite0")
    p.add_argument("--train-json", required=True)
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-json")
    p.add_argument("--val-images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set transformer.num_decoder_layers=6 "
                        "--set data.train_scales=(480,512); repeatable")
    p.add_argument("--aux-heads", help="comma-separated heads (atss,rcnn,retina,fcos); '' for none (K=0); "
                                       "default: the preset's")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int)
    budget.add_argument("--iters", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=["step", "cosine", "constant"], default="step")
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--amp", choices=["bf16", "fp16"])
    p.add_argument("--ema", type=float, help="EMA decay, e.g. 0.9998")
    p.add_argument("--eval-every", type=int, default=1, help="epochs; 0: at the end only")
    p.add_argument("--checkpoint-every", type=int, default=0, help="iterations; 0: every epoch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--pretrained", help="start from this checkpoint's weights (classifiers of another class "
                                        "count are re-initialised)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument("--record-instability", type=int, default=0, metavar="N",
                   help="record Hungarian matching instability per epoch on N training images "
                        "(OUT/instability.csv); 0: off")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_train)

    def tta_arguments(p):
        p.add_argument("--tta", action="store_true", help="test-time augmentation: horizontal flip x --tta-scales, "
                                                          "detections merged by --tta-merge")
        p.add_argument("--tta-scales", default="1", help="comma-separated view sizes relative to the eval size")
        p.add_argument("--tta-merge", choices=["vote", "wbf"], default="vote",
                       help="NMS + box voting, or weighted box fusion")

    checkpoint_help = "a training checkpoint (.pt) or an exported model (.onnx, .pt2)"
    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--json", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", help="also write the detections as a COCO results json")
    tta_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="detect objects in images: JSON + PNG with drawn boxes")
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--out", required=True)
    p.add_argument("--min-score", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=1, help="images run at once (padded to the largest)")
    p.add_argument("--device", default="cpu")
    tta_arguments(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a checkpoint's inference model to ONNX or torch.export")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torch-export"])
    p.add_argument("--out", required=True, help="the file: .onnx, or .pt2 for torch-export")
    p.add_argument("--image-size", metavar="HxW", help="padded input size of a fixed-size export "
                                                       "(default: max_size x max_size of the preset)")
    p.add_argument("--dynamic", action="store_true", help="batch, height and width dynamic (sides >= 128)")
    p.set_defaults(func=_export)

    p = sub.add_parser("convert", help="convert a checkpoint between the official Co-DETR layout and ours")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--from", dest="source", choices=["official"],
                     help="SRC is an official (Sense-X) Co-Deformable-DETR checkpoint")
    fmt.add_argument("--to", dest="target", choices=["official"], help="SRC is a codetr checkpoint; write the "
                                                                       "official layout")
    p.add_argument("--preset", help="our preset of the same architecture (default co_deformable_detr_r50)")
    p.add_argument("--inference", action="store_true",
                   help="keep the detector only (the K=0 inference model; the auxiliary branches are dropped)")
    p.add_argument("--num-classes", type=int, help="fine-tuning on another class count: classifiers re-initialised")
    p.add_argument("--class-names-from", metavar="COCO_JSON", help="class names (and count) from a COCO json")
    p.set_defaults(func=_convert)

    p = sub.add_parser("analyze", help="the paper's analyses (needs matplotlib: pip install codetr[analysis])")
    asub = p.add_subparsers(dest="analysis", required=True)
    a = asub.add_parser("instability", help="plot matching instability per epoch of runs trained with "
                                            "--record-instability")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--labels", nargs="+", help="one name per run (default: the folder names)")
    a.add_argument("--out", required=True)
    a.set_defaults(func=_analyze_instability)
    a = asub.add_parser("discriminability", help="IoF-IoB curves and heat maps of the encoder's feature norms")
    a.add_argument("--checkpoint", nargs="+", required=True)
    a.add_argument("--labels", nargs="+", help="one name per checkpoint (default: the folder names)")
    a.add_argument("--json", required=True)
    a.add_argument("--images", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--num-images", type=int, default=50, help="the first N images of the json")
    a.add_argument("--num-overlays", type=int, default=4, help="heat-map PNGs for the first N images")
    a.add_argument("--device", default="cpu")
    a.set_defaults(func=_analyze_discriminability)

    p = sub.add_parser("demo", help="synthetic data: train K=0 and K=2 briefly, evaluate, draw predictions")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iters", type=int, help="training iterations per model (default: the demo's measured budget)")
    p.set_defaults(func=lambda a: __import__("codetr.demo", fromlist=["main"]).main(a.out, a.iters))

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"codetr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
