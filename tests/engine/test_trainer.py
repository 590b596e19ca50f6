"""Trainer: exact resume, atomic checkpoints, non-finite steps, evaluation, the CLI,
gradient accumulation and torchrun DDP against the larger batch, AMP bf16, EMA."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codetr.data import ensure_synthetic_dataset
from codetr.engine import Trainer, load_checkpoint, save_checkpoint
from codetr.engine.data import EpochBatchSampler
from tiny_run import TINY, TINY_SETS, tiny_config

# For comparing runs that split the same images differently into batches and processes:
# every (64 x 64) training image stays 64 x 64 (no rescale, the crop takes it whole), so no
# batch is padded; no gradient clipping, which would hide a wrong scale of a step's gradient.
EXACT = {**TINY, "data.train_scales": (64,), "data.crop_sizes": (64, 64), "optim.grad_clip": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=6, num_val=3,
                                    image_size=(64, 64), max_objects=3)


def _cfg(data, out, **kw):
    return tiny_config(data, out, **{"iters": 6, "checkpoint_every": 2, **kw})


def _losses(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_continues_exactly(data, tmp_path):
    full = tmp_path / "full"
    Trainer(_cfg(data, full)).train()

    class Interrupted(Trainer):
        def save(self, name="last.pt"):
            path = super().save(name)
            if self.iteration == 4:
                raise KeyboardInterrupt
            return path

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        Interrupted(_cfg(data, part)).train()
    assert load_checkpoint(part / "last.pt")["iteration"] == 4
    Trainer(_cfg(data, part, resume=True)).train()
    a, b = _losses(full), _losses(part)
    assert [r["iter"] for r in b] == [1, 2, 3, 4, 5, 6]
    # 6 iterations of 3 batches per epoch: the resume starts mid-way through epoch 1
    for ra, rb in zip(a, b):
        assert ra["iter"] == rb["iter"] and ra["lr"] == rb["lr"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), ra["iter"]
    wa, wb = load_checkpoint(full / "last.pt")["model"], load_checkpoint(part / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_from_another_configuration_is_a_clear_error(data, tmp_path):
    Trainer(_cfg(data, tmp_path, iters=1)).train()
    with pytest.raises(RuntimeError, match="missing: aux_heads.rcnn"):
        Trainer(_cfg(data, tmp_path, iters=2, resume=True, aux_heads=("atss", "rcnn"))).train()


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint({"w": torch.zeros(3), "x": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(3)}, path)
    code = (f"import os, torch; from codetr.engine import checkpoint as c\n"
            f"real = torch.save\n"
            f"def dying(obj, f):\n    f.write(b'partial'); f.flush(); os._exit(9)\n"
            f"torch.save = dying\nc.save_checkpoint({{'w': torch.zeros(3)}}, {str(path)!r})\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))


def test_non_finite_losses_skip_steps_then_stop(data, tmp_path):
    class Poisoned(Trainer):
        def _forward_backward(self, images, masks, targets, accum, sync):
            head = self.model.aux_heads["atss"]
            if self.batches_done >= 2 and not hasattr(head, "real_forward"):  # from batch 2 on
                head.real_forward = head.forward

                def nan_forward(*args):
                    losses, positives = head.real_forward(*args)
                    return {**losses, "loss_cls": losses["loss_cls"] * float("nan")}, positives
                head.forward = nan_forward
            return super()._forward_backward(images, masks, targets, accum, sync)

    with pytest.warns(UserWarning, match="non-finite loss in .*atss"), \
            pytest.raises(RuntimeError, match="3 consecutive steps with non-finite"):
        Poisoned(_cfg(data, tmp_path, max_nonfinite=3, checkpoint_every=1)).train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 3  # 1 good step, then 2 skipped ones (the 3rd stopped training)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_epoch_batches_shard_across_ranks():
    one = EpochBatchSampler(10, 2, seed=0, epoch=3)
    ranks = [list(EpochBatchSampler(10, 2, seed=0, epoch=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 10 padded to 12
    seen = sorted(i for r in ranks for b in r for i in b)
    assert set(seen) == set(range(10)) and len(seen) == 12
    assert sorted(i for b in one for i in b) == list(range(10))
    assert list(EpochBatchSampler(10, 2, 0, 3, start=2)) == list(one)[2:]
    assert list(one) != list(EpochBatchSampler(10, 2, 0, 4))


def test_cli_train_then_eval(data, tmp_path):
    tj, ti = str(data["train"]["ann_file"]), str(data["train"]["images_dir"])
    vj, vi = str(data["val"]["ann_file"]), str(data["val"]["images_dir"])
    run = lambda *a: subprocess.run([sys.executable, "-m", "codetr", *a], capture_output=True, text=True)  # noqa: E731
    r = run("train", "--preset", "nope", "--train-json", tj, "--train-images", ti, "--out", str(tmp_path))
    assert r.returncode == 2 and "--preset: unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "--train-json", str(tmp_path / "missing.json"), "--train-images", ti, "--out", str(tmp_path))
    assert r.returncode == 2 and "missing.json" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", "--checkpoint", str(tmp_path / "none.pt"), "--json", vj, "--images", vi)
    assert r.returncode == 2 and "none.pt" in r.stderr

    r = run("train", "--train-json", tj, "--train-images", ti, "--out", str(tmp_path), "--set", "transformer.nope=1")
    assert r.returncode == 2 and "unknown config field 'transformer.nope'" in r.stderr

    # a real (tiny) run: train -> eval -> predict, all through the CLI
    r = run("train", "--aux-heads", "atss", "--train-json", tj, "--train-images", ti, "--val-json", vj,
            "--val-images", vi, "--iters", "2", "--batch-size", "2", "--workers", "0", "--eval-every", "0",
            "--out", str(tmp_path / "run"), *TINY_SETS)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"AP", "AP50"}
    r = run("eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--json", vj, "--images", vi,
            "--results", str(tmp_path / "res.json"))
    assert r.returncode == 0, r.stderr
    assert "AP50" in r.stdout and json.loads((tmp_path / "res.json").read_text()) is not None
    images = sorted(data["val"]["images_dir"].iterdir())[:2]
    r = run("predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), *map(str, images), "--out",
            str(tmp_path / "pred"), "--min-score", "0")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    for im in images:
        dets = json.loads((tmp_path / "pred" / f"{im.stem}.json").read_text())["detections"]
        assert len(dets) == 20 and all(0 <= d["score"] <= 1 and len(d["box_xyxy"]) == 4 for d in dets)
        with Image.open(tmp_path / "pred" / f"{im.stem}.png") as drawn, Image.open(im) as orig:
            assert drawn.size == orig.size
    # a folder, in batches of two, with test-time augmentation; eval with it
    r = run("predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(data["val"]["images_dir"]),
            "--out", str(tmp_path / "pred_tta"), "--batch-size", "2", "--tta", "--tta-scales", "0.8,1",
            "--min-score", "0")
    assert r.returncode == 0, r.stderr
    assert sorted(f.stem for f in (tmp_path / "pred_tta").glob("*.json")) == sorted(
        f.stem for f in data["val"]["images_dir"].iterdir())
    r = run("eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--json", vj, "--images", vi, "--tta",
            "--tta-merge", "vote")
    assert r.returncode == 0 and "AP50" in r.stdout, r.stderr
    r = run("predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(tmp_path), "--out",
            str(tmp_path / "pred"), "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size: expected >= 1, got 0" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(tmp_path / "empty"), "--out",
            str(tmp_path / "pred"))
    assert r.returncode == 2 and "empty: no images (.jpg" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = run("predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(tmp_path / "bad.png"), "--out",
            str(tmp_path / "pred"))
    assert r.returncode == 2 and "cannot decode image" in r.stderr and "Traceback" not in r.stderr


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt.get("model", ckpt)


def _assert_same_weights(a, b, rtol=1e-5, atol=1e-5):
    """All weights close. Adam divides each gradient element by its own magnitude, so an
    element whose gradient is almost 0 moves by rounding noise: atol is 5% of one lr step
    (2e-4; a wrong normaliser moved weights by ~1e-4). The key biases of the attention
    layers (the middle third of in_proj_bias) are left out: softmax cancels the q.b they add
    to every logit of a query, so their gradient is 0 but rounding, moving them by up to lr."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            d = len(x) // 3
            x, y = torch.cat((x[:d], x[2 * d:])), torch.cat((y[:d], y[2 * d:]))
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _uneven_json(data, path):
    """The training json with boxes removed so that the 2 images of each batch of 2 (seed 0,
    epoch 0) hold different numbers of boxes, and the second image of the first batch none
    (with one image per process on 2 processes: rank 1 gets no box on step 1)."""
    ann = json.loads(Path(data["train"]["ann_file"]).read_text())
    ids = sorted(im["id"] for im in ann["images"])
    batches = [[ids[i] for i in b] for b in EpochBatchSampler(len(ids), 2, seed=0, epoch=0)]
    count = lambda i: sum(a["image_id"] == i for a in ann["annotations"])  # noqa: E731
    drop = {batches[0][1]: count(batches[0][1])}
    drop.update({a: 1 for a, b in batches[1:] if count(a) == count(b)})
    kept = []
    for a in ann["annotations"]:
        if drop.get(a["image_id"], 0):
            drop[a["image_id"]] -= 1
        else:
            kept.append(a)
    ann["annotations"] = kept
    assert count(batches[0][1]) == 0 < count(batches[0][0])
    assert all(count(a) != count(b) for a, b in batches), [(count(a), count(b)) for a, b in batches]
    path.write_text(json.dumps(ann))
    return str(path)


def test_gradient_accumulation_equals_the_larger_batch(data, tmp_path):
    """K=0: batches of 1 image accumulated 2 by 2 = batches of the same 2 images (same
    weights and logged losses after 3 steps), although the 2 images hold different numbers
    of boxes: the DETR normaliser counts the boxes of the whole step."""
    flat = lambda s: [i for b in s for i in b]  # noqa: E731
    assert flat(EpochBatchSampler(6, 1, 0, 0)) == flat(EpochBatchSampler(6, 2, 0, 0))  # same image order
    kw = dict(train_json=_uneven_json(data, tmp_path / "train.json"), aux_heads=(), overrides=EXACT, iters=3,
              checkpoint_every=0)
    Trainer(_cfg(data, tmp_path / "big", batch_size=2, **kw)).train()
    Trainer(_cfg(data, tmp_path / "accum", batch_size=1, grad_accum=2, **kw)).train()
    for ra, rb in zip(_losses(tmp_path / "big"), _losses(tmp_path / "accum"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["iter"]
    _assert_same_weights(_weights(tmp_path / "big" / "last.pt"), _weights(tmp_path / "accum" / "last.pt"))


def test_torchrun_ddp_equals_one_process_on_the_combined_batch(data, tmp_path):
    """2 gloo processes with torchrun, 1 image each per step, vs 1 process with batches of the
    same 2 images. On the first step rank 1's image has no box. K=0: the same weights;
    K=2 (atss, rcnn): runs (every parameter gets a gradient) and the ranks stay identical."""
    # on each step the 2 ranks hold the images of one batch of 2 (those of _uneven_json)
    rank0, rank1 = (list(EpochBatchSampler(6, 1, 0, 0, rank=r, world_size=2)) for r in (0, 1))
    assert [a + b for a, b in zip(rank0, rank1)] == list(EpochBatchSampler(6, 2, 0, 0))
    common = dict(train_json=_uneven_json(data, tmp_path / "train.json"), overrides=EXACT, checkpoint_every=0)

    val = dict(val_json=str(data["val"]["ann_file"]), val_images=str(data["val"]["images_dir"]))
    configs = []
    for name, heads, iters, extra in (("k0", (), 3, {}), ("k2", ("atss", "rcnn"), 2, val)):
        cfg = _cfg(data, tmp_path / name, aux_heads=heads, iters=iters, batch_size=1, **common, **extra)
        configs.append(tmp_path / f"{name}.json")
        configs[-1].write_text(json.dumps(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_train.py")), *map(str, configs)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in ("k0", "k2"):
        w0, w1 = _weights(tmp_path / name / "rank0.pt"), _weights(tmp_path / name / "rank1.pt")
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name  # DDP keeps the ranks bit-identical
        assert all(torch.isfinite(v).all() for v in w0.values() if v.is_floating_point())
    # only rank 0 writes (one log record per step); it evaluates while rank 1 waits
    assert [r["iter"] for r in _losses(tmp_path / "k0")] == [1, 2, 3]
    assert [r["iter"] for r in _losses(tmp_path / "k2")] == [1, 2]
    log = (tmp_path / "k2" / "log.jsonl").read_text().splitlines()
    assert ["AP" in r.get("eval", {}) for r in map(json.loads, log)] == [False, False, True]

    Trainer(_cfg(data, tmp_path / "one", aux_heads=(), iters=3, batch_size=2, **common)).train()
    _assert_same_weights(_weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "k0" / "rank0.pt"))


def test_amp_bf16_runs_20_steps_without_nan(data, tmp_path, recwarn):
    dtypes = set()

    class RecordDtypes:  # proves autocast is on: a decoder Linear computes in bf16
        def on_train_start(self, trainer):
            linear = trainer.model.detector.decoder.layers[0].ffn.linear1
            linear.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))

    # Short side >= 96: torch 2.14's CPU (oneDNN) bf16 conv gives wrong weight gradients
    # (often NaN) for inputs 1 pixel wide at stride 2, as the adapter's stride-128 conv gets
    # from 64-pixel images; the trainer would skip those steps (next test).
    overrides = {**TINY, "data.train_scales": (96, 112), "data.max_size": 128}
    Trainer(_cfg(data, tmp_path, aux_heads=("atss", "rcnn"), overrides=overrides, iters=20, batch_size=1,
                 amp="bf16", checkpoint_every=0), callbacks=[RecordDtypes()]).train()
    assert dtypes == {torch.bfloat16}
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
    records = _losses(tmp_path)
    assert len(records) == 20 and all(math.isfinite(v) for r in records for k, v in r.items() if "loss" in k)
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "last.pt").values() if v.is_floating_point())


def test_a_non_finite_gradient_skips_the_step(data, tmp_path):
    """A NaN gradient with a finite loss (no GradScaler to catch it): a warning naming the
    parameter, the step is skipped, and the weights stay finite."""
    class NanGradient:
        def on_train_start(self, trainer):
            nan_at_1 = lambda g: g * float("nan") if trainer.iteration == 1 else g  # noqa: E731
            trainer.model.detector.level_embed.register_hook(nan_at_1)

    with pytest.warns(UserWarning, match=r"iteration 1: non-finite gradient of 1 parameters \(detector.level_embed\)"):
        Trainer(_cfg(data, tmp_path, aux_heads=(), iters=3, checkpoint_every=0), callbacks=[NanGradient()]).train()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ema_is_the_exponential_average_of_the_weights(data, tmp_path):
    d, seen = 0.5, []

    class Recording(Trainer):  # the weights before training and after each step
        def train(self):
            seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
            return super().train()

        def _step(self):
            stepped = super()._step()
            seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
            return stepped

    Recording(_cfg(data, tmp_path, aux_heads=(), iters=2, ema_decay=d, checkpoint_every=0)).train()
    w0, w1, w2 = seen
    ema = load_checkpoint(tmp_path / "last.pt")["ema"]
    for k, v in ema.items():
        expect = d * (d * w0[k] + (1 - d) * w1[k]) + (1 - d) * w2[k] if v.is_floating_point() else w2[k]
        torch.testing.assert_close(v, expect, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(w0[k], w2[k]) for k in w0)  # training moved the weights


def test_load_pretrained_reinitialises_only_the_classifiers(data, tmp_path):
    from codetr.config import build_model
    from codetr.engine import load_pretrained

    Trainer(_cfg(data, tmp_path, iters=1)).train()
    ckpt = load_checkpoint(tmp_path / "last.pt")["model"]
    torch.manual_seed(123)
    model = build_model("co_deformable_detr_lite0", 2, aux_heads=("atss",), **TINY)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = load_pretrained(model, tmp_path / "last.pt")
    # the tensors whose shape depends on the class count (the synthetic set has more classes)
    assert set(skipped) == {k for k, v in fresh.items() if v.shape != ckpt[k].shape} != set()
    assert all("class" in k or "cls" in k for k in skipped)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in skipped else ckpt[k], rtol=0, atol=0)
