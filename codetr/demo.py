"""The demo (the README's main command): on the embedded synthetic dataset, train the CPU
preset with K = 0 (Deformable-DETR++) and K = 2 (Co-DETR: ATSS + Faster R-CNN) for the same
short budget, evaluate both, print a table and draw a few predictions."""
from __future__ import annotations

import json
from pathlib import Path

from codetr.data import ensure_synthetic_dataset

# The synthetic images are 256 x 256: train and evaluate near that size (the preset's
# 384-512 would only upsample them and cost ~3x the time).
DEMO_OVERRIDES = {"data.train_scales": (224, 256, 288), "data.max_size": 384, "data.crop_sizes": (128, 224),
                  "data.resize_before_crop": (200, 256)}
VARIANTS = {"K=0 (Deformable-DETR++)": (), "K=2 (Co-DETR: atss+rcnn)": ("atss", "rcnn")}


def main(out: str = "runs/demo", iters: int = 150) -> int:
    from codetr.engine import TrainConfig, Trainer
    from codetr.engine.predictor import Predictor, draw_detections

    out = Path(out)
    data = ensure_synthetic_dataset(out / "data", num_train=200, num_val=50)
    rows = []
    for name, heads in VARIANTS.items():
        run = out / ("k%d" % len(heads))
        print(f"== {name}: {iters} iterations -> {run}", flush=True)
        cfg = TrainConfig(train_json=str(data["train"]["ann_file"]), train_images=str(data["train"]["images_dir"]),
                          val_json=str(data["val"]["ann_file"]), val_images=str(data["val"]["images_dir"]),
                          out_dir=str(run), preset="co_deformable_detr_lite0", aux_heads=heads,
                          overrides=dict(DEMO_OVERRIDES), iters=iters, eval_every=0, checkpoint_every=iters,
                          warmup_iters=min(20, iters), num_workers=1)
        metrics = Trainer(cfg).train()
        logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        times = [r["time_per_iter"] for r in logs if "time_per_iter" in r]
        times = times[1:] or times  # the first window includes the warm-up
        rows.append({"model": name, "AP": metrics["AP"], "AP50": metrics["AP50"],
                     "s_per_iter": sum(times) / max(len(times), 1)})
    print()
    print(f"{'model':<26} {'AP':>6} {'AP50':>6} {'s/iter':>7}")
    for r in rows:
        print(f"{r['model']:<26} {100 * r['AP']:6.1f} {100 * r['AP50']:6.1f} {r['s_per_iter']:7.2f}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))

    predictor = Predictor.from_checkpoint(out / "k2" / "last.pt", min_score=0.3)
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for image in sorted(Path(data["val"]["images_dir"]).iterdir())[:4]:
        pil = predictor.load_image(image)
        draw_detections(pil, predictor.predict(pil)).save(pred_dir / f"{image.stem}.png")
    print(f"\npredictions of the K=2 model drawn in {pred_dir}; table in {out / 'summary.json'}")
    return 0
