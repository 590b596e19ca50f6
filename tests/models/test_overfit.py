"""Learning works: the lite preset (reduced sizes) overfits 4 synthetic images."""
import time

import torch

from codetr.config import build_detector, get_preset, param_groups
from codetr.data.coco import CocoDetection
from codetr.data.collate import collate
from codetr.data.synthetic import generate_synthetic_coco
from codetr.data.transforms import Compose, Normalize, ToTensor
from codetr.evaluation import CocoEvaluator

STEPS = 80  # fixed budget; AP50 reached 1.0 at 50 steps when this test was written


def test_overfits_four_synthetic_images(tmp_path):
    threads = torch.get_num_threads()
    # One thread: on a shared, oversubscribed CPU, OpenMP threads spin-waiting on each other
    # made a step 30x slower than its single-thread CPU time.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        ann = generate_synthetic_coco(tmp_path, 4, (160, 160), seed=0, max_objects=5, min_size=16)
        ds = CocoDetection(tmp_path / "images", ann, transforms=Compose([ToTensor(), Normalize()]))
        images, masks, targets = collate([ds[i] for i in range(len(ds))], size_divisibility=32)
        model = build_detector("deformable_detr_pp_lite0", ds.num_classes, **{
            "transformer.d_model": 128, "transformer.dim_feedforward": 256,
            "transformer.num_encoder_layers": 2, "transformer.num_decoder_layers": 2, "num_queries": 50})
        optim_cfg = get_preset("deformable_detr_pp_lite0").optim
        optim_cfg.lr = 1e-3  # higher than the preset's 2e-4: we want to memorise, fast
        opt = torch.optim.AdamW(param_groups(model, optim_cfg), weight_decay=optim_cfg.weight_decay)
        start = time.time()
        model.train()
        for _ in range(STEPS):
            loss = sum(model(images, masks, targets).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(images, masks, targets)
        ev = CocoEvaluator(ds.coco, ds.label_to_cat_id)
        ev.update({t["image_id"]: o for t, o in zip(targets, out)})
        stats = ev.summarize()
        print(f"overfit: {STEPS} steps, {time.time() - start:.1f} s, AP50 {stats['AP50']:.3f}, AP {stats['AP']:.3f}")
        assert stats["AP50"] > 0.9, stats
    finally:
        torch.set_num_threads(threads)
