"""The demo (the README's main command): on the embedded synthetic dataset, train the CPU
preset as K = 0 (Deformable-DETR++) and K = 2 (Co-DETR: ATSS + Faster R-CNN) for the same
budget, evaluate both, and leave in OUT: the table (results.md, summary.json), the two
training curves (curves.png) and validation images with the ground truth and both models'
detections side by side (predictions/)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from codetr.data import ensure_synthetic_dataset

# The settings below were chosen by measuring several on our 2-core CPU (the closing note of
# the demo issue has the table): a demo-sized model and data, not the paper's.
IMAGE_SIZE = 192
NUM_TRAIN, NUM_VAL = 200, 50
DEMO_OVERRIDES = {
    # Train and evaluate near the images' native size.
    "data.train_scales": (176, 192, 208), "data.max_size": 256, "data.crop_sizes": (112, 176),
    "data.resize_before_crop": (160, 192),
    # A demo-width transformer and 100 queries (<= 8 objects per image).
    "transformer.d_model": 128, "transformer.n_heads": 4, "transformer.dim_feedforward": 512,
    "num_queries": 100, "co.max_group_size": 100,
    "co.head_options": {"rcnn": {"fc_channels": 256, "roi_num": 128, "max_proposals": 300}},
}
TRAIN = {"iters": 420, "batch_size": 2, "lr": 4e-4, "warmup_iters": 20}
EVALS = 5  # validation points on each curve
VARIANTS = {"K=0 (Deformable-DETR++)": (), "K=2 (Co-DETR: atss+rcnn)": ("atss", "rcnn")}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def main(out: str = "runs/demo", iters: Optional[int] = None) -> int:
    from codetr.engine import TrainConfig, Trainer
    from codetr.engine.data import EpochBatchSampler

    out, iters = Path(out), iters or TRAIN["iters"]
    print(f"== data: synthetic shapes, {NUM_TRAIN} train / {NUM_VAL} val images of {IMAGE_SIZE} px -> {out / 'data'}",
          flush=True)
    data = ensure_synthetic_dataset(out / "data", num_train=NUM_TRAIN, num_val=NUM_VAL,
                                    image_size=(IMAGE_SIZE, IMAGE_SIZE), progress=True)
    steps_per_epoch = EpochBatchSampler.steps_per_epoch(NUM_TRAIN, TRAIN["batch_size"])
    eval_every = max(1, round(iters / steps_per_epoch / EVALS))  # epochs
    rows, runs = [], {}
    for name, heads in VARIANTS.items():
        run = runs[name] = out / ("k%d" % len(heads))
        shutil.rmtree(run, ignore_errors=True)  # a previous demo's logs would join this one's curves
        print(f"\n== {name}: {iters} iterations of {TRAIN['batch_size']} images -> {run}", flush=True)
        cfg = TrainConfig(train_json=str(data["train"]["ann_file"]), train_images=str(data["train"]["images_dir"]),
                          val_json=str(data["val"]["ann_file"]), val_images=str(data["val"]["images_dir"]),
                          out_dir=str(run), preset="co_deformable_detr_lite0", aux_heads=heads,
                          overrides=dict(DEMO_OVERRIDES), iters=iters, batch_size=TRAIN["batch_size"],
                          lr=TRAIN["lr"], warmup_iters=min(TRAIN["warmup_iters"], iters), eval_every=eval_every,
                          checkpoint_every=iters, num_workers=1)
        metrics = Trainer(cfg).train()
        times = [r["time_per_iter"] for r in _log(run) if "time_per_iter" in r]
        times = times[1:] or times  # the first window includes the warm-up
        rows.append({"model": name, **{k: metrics[k] for k in METRICS},
                     "s_per_iter": sum(times) / max(len(times), 1)})

    table = _table(rows)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    curves = _plot_curves(runs, out / "curves.png")
    pred_dir = _draw_predictions(runs, Path(data["val"]["images_dir"]), Path(data["val"]["ann_file"]),
                                 out / "predictions")
    print(f"\nin {out}: results.md (the table), summary.json, {curves.name if curves else 'no curves.png'}"
          f" (loss and val AP per iteration), {pred_dir.name}/ (ground truth | K=0 | K=2), k0/ and k2/ "
          "(checkpoints last.pt, logs log.jsonl)")
    return 0


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _table(rows: list[dict]) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " | s/iter |", "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" if r[k] >= 0 else "-" for k in METRICS]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['s_per_iter']:.2f} |")
    return "\n".join(lines)


def _plot_curves(runs: dict[str, Path], path: Path):
    """Training loss and validation AP / AP50 against iterations, both models on one figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no curves.png")
        return None
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:red")):
        log = _log(run)
        train = [r for r in log if "loss" in r]
        # K = 2's total includes its auxiliary losses: plot the one-to-one (DETR) part of both.
        one_to_one = [sum(v for k, v in r.items() if k.startswith("one_to_one.")) for r in train]
        ax_loss.plot([r["iter"] for r in train], one_to_one, color=color, label=name)
        evals = [r for r in log if "eval" in r]
        its = [r["iter"] for r in evals]
        ax_ap.plot(its, [100 * r["eval"]["AP50"] for r in evals], "o-", color=color, label=f"{name} AP50")
        ax_ap.plot(its, [100 * r["eval"]["AP"] for r in evals], "s--", color=color, label=f"{name} AP")
    ax_loss.set(xlabel="iteration", ylabel="one-to-one (Hungarian) loss", title="training loss")
    ax_ap.set(xlabel="iteration", ylabel="val AP (%)", title="validation")
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_predictions(runs: dict[str, Path], images_dir: Path, ann_file: Path, out: Path,
                      num_images: int = 4, min_score: float = 0.25, scale: int = 2) -> Path:
    """For the first validation images: ground truth | each model's detections (score >=
    min_score), side by side in one PNG per image, titled."""
    from codetr.engine.predictor import Predictor, draw_detections

    import torch

    out.mkdir(parents=True, exist_ok=True)
    coco = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    cat_index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    predictors = {name: Predictor.from_checkpoint(run / "last.pt", min_score=min_score) for name, run in runs.items()}
    for im in coco["images"][:num_images]:
        pil = Predictor.load_image(images_dir / im["file_name"])
        big = pil.resize((pil.width * scale, pil.height * scale), Image.BICUBIC)  # room for the labels
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        gt = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4),
              "labels": torch.tensor([cat_index[a["category_id"]] for a in anns], dtype=torch.long),
              "class_names": [names[a["category_id"]] for a in anns]}
        panels = {"ground truth": gt, **{name: p.predict(pil) for name, p in predictors.items()}}
        panels = {title: draw_detections(big, {**d, "boxes": d["boxes"] * scale}) for title, d in panels.items()}
        _side_by_side(panels).save(out / f"{Path(im['file_name']).stem}.png")
    return out


def _side_by_side(panels: dict[str, Image.Image], title_h: int = 18) -> Image.Image:
    w, h = next(iter(panels.values())).size
    canvas = Image.new("RGB", (len(panels) * w, h + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels.items()):
        canvas.paste(panel, (i * w, title_h))
        draw.text((i * w + 4, 3), title, fill="black")
    return canvas
