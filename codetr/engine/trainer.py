"""The training loop: AdamW with the paper's parameter groups, schedules, gradient
accumulation, AMP, EMA, atomic checkpoints with exact resume, periodic COCO evaluation,
JSON-lines logs, DDP (torchrun)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from codetr.config import apply_overrides, build_model, get_preset, param_groups

from . import data as data_lib
from .checkpoint import load_checkpoint, load_model_state, load_pretrained, save_checkpoint
from .evaluate import evaluate


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` fields take the preset's value."""

    train_json: str
    train_images: str
    out_dir: str
    preset: str = "co_deformable_detr_lite0"
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    aux_heads: Optional[tuple[str, ...]] = None  # None: the preset's; () = the K=0 baseline
    overrides: dict = field(default_factory=dict)  # dotted config fields, see config.build_model
    epochs: Optional[int] = None  # budget: epochs, or iters (iters wins when both are set)
    iters: Optional[int] = None
    batch_size: Optional[int] = None  # per process
    lr: Optional[float] = None
    schedule: Literal["step", "cosine", "constant"] = "step"
    warmup_iters: int = 0
    grad_accum: int = 1  # optimizer step every grad_accum batches (same as a grad_accum x larger batch)
    amp: Optional[Literal["bf16", "fp16"]] = None
    ema_decay: Optional[float] = None
    eval_every: int = 1  # epochs (0: only at the end)
    checkpoint_every: int = 0  # iterations (0: at the end of each epoch)
    log_every: int = 10
    num_workers: int = 2
    seed: int = 0
    resume: bool = False
    max_nonfinite: int = 5  # consecutive steps skipped for non-finite losses or gradients before training stops
    device: Optional[str] = None
    pretrained: Optional[str] = None  # a checkpoint to start from; classifiers of another shape are re-initialised
    tensorboard: bool = False  # also log scalars to OUT/tensorboard (needs the tensorboard package)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed(device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1),
    unless one exists already: NCCL for CUDA devices, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ModelEMA:
    """Exponential moving average of the weights (and a copy of the buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.module = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1.0 - self.decay)
            else:
                e.copy_(p)


class Trainer:
    """``Trainer(cfg).train()`` runs the budget and returns the final metrics (the last
    evaluation's summary, or {}).

    callbacks: objects with any of ``on_train_start(trainer)``, ``on_epoch_end(trainer,
    epoch)`` (epoch = number of epochs completed) and ``on_train_end(trainer)``; they run on
    every rank (check ``trainer.rank`` before writing files).
    """

    def __init__(self, cfg: TrainConfig, callbacks: Sequence = ()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        init_distributed(self.device)
        self.rank, self.world_size = _world()
        # With the overrides: those of data.* shape the datasets built next.
        self.model_cfg = apply_overrides(get_preset(cfg.preset), cfg.overrides)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        dcfg = self.model_cfg.data
        self.train_set = data_lib.build_dataset(dcfg, cfg.train_json, cfg.train_images, train=True)
        self.val_set = (data_lib.build_dataset(dcfg, cfg.val_json, cfg.val_images, train=False)
                        if cfg.val_json else None)
        if self.val_set is not None and self.val_set.class_names != self.train_set.class_names:
            raise ValueError(f"val_json: classes {self.val_set.class_names} differ from the training "
                             f"set's {self.train_set.class_names}")
        self.model = build_model(self.model_cfg, self.train_set.num_classes, aux_heads=cfg.aux_heads,
                                 **cfg.overrides).to(self.device)
        self.model_cfg = self.model.config  # with the overrides and aux heads applied
        ocfg = self.model_cfg.optim
        if cfg.lr is not None:
            ocfg.lr = cfg.lr
        self.batch_size = cfg.batch_size or ocfg.batch_size
        self.optimizer = torch.optim.AdamW(param_groups(self.model, ocfg), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        self.ddp_model = self.model
        if self.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        steps_per_epoch = data_lib.EpochBatchSampler.steps_per_epoch(len(self.train_set), self.batch_size,
                                                                     self.world_size)
        self.steps_per_epoch = steps_per_epoch
        epochs = cfg.epochs if cfg.epochs is not None else ocfg.epochs
        batches = cfg.iters * cfg.grad_accum if cfg.iters is not None else epochs * steps_per_epoch
        self.total_iters = batches // cfg.grad_accum  # optimizer steps
        # lr drops at the preset's epochs, as fractions of the budget (11/12 of it for 1x).
        self.milestones = [round(e / ocfg.epochs * self.total_iters) for e in ocfg.lr_drop_epochs]

        if cfg.pretrained and not cfg.resume:
            skipped = load_pretrained(self.model, cfg.pretrained)
            if _is_main() and skipped:
                warnings.warn(f"pretrained: kept the initialisation of {len(skipped)} tensors: {', '.join(skipped)}")
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.out_dir = Path(cfg.out_dir)
        self.iteration = 0  # optimizer steps done
        self.batches_done = 0  # batches consumed (iteration * grad_accum, plus a partial step)
        self.metrics: dict = {}
        self._tb = None  # the TensorBoard writer, created on first use
        if cfg.resume:
            self._resume()

    # ------------------------------------------------------------------ schedule

    def lr_factor(self, it: int) -> float:
        """lr multiplier at optimizer step ``it``: linear warmup, then step (x0.1 at each
        milestone), cosine (to 0 at the end) or constant."""
        warm = min(1.0, (it + 1) / self.cfg.warmup_iters) if self.cfg.warmup_iters else 1.0
        if self.cfg.schedule == "step":
            f = 0.1 ** sum(it >= m for m in self.milestones)
        elif self.cfg.schedule == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(it / max(self.total_iters, 1), 1.0)))
        else:
            f = 1.0
        return warm * f

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "iteration": self.iteration,
            "batches_done": self.batches_done,
            "model_config": dataclasses.asdict(self.model_cfg),
            "train_config": dataclasses.asdict(self.cfg),
            "class_names": self.train_set.class_names,
            "label_to_cat_id": self.train_set.label_to_cat_id,
            "metrics": self.metrics,
        }

    def save(self, name: str = "last.pt") -> Optional[Path]:
        if not _is_main():
            return None
        return save_checkpoint(self.state_dict(), self.out_dir / name)

    def _resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {path}")
        ckpt = load_checkpoint(path, map_location=self.device)
        load_model_state(self.model, ckpt["model"], source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt["ema"] is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        random.setstate(_tuplify(ckpt["rng"]["python"]))
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            # map_location moved the saved states to the GPU; the generators take CPU ByteTensors.
            torch.cuda.set_rng_state_all([state.cpu() for state in ckpt["rng"]["cuda"]])
        self.iteration, self.batches_done = ckpt["iteration"], ckpt["batches_done"]
        self.metrics = ckpt.get("metrics", {})

    # ------------------------------------------------------------------ loop

    def _autocast(self):
        if self.cfg.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.cfg.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _log(self, record: dict) -> None:
        if not _is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise RuntimeError("tensorboard=True needs the tensorboard package: pip install tensorboard") from e
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            scalars = {**record, **{f"eval/{k}": v for k, v in record.get("eval", {}).items()}}
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and k not in ("iter", "epoch"):
                    self._tb.add_scalar(k, v, record["iter"])

    def _callback(self, event: str, *args) -> None:
        for cb in self.callbacks:
            if hasattr(cb, event):
                getattr(cb, event)(self, *args)

    def train(self) -> dict:
        cfg = self.cfg
        self._callback("on_train_start")
        dataset = data_lib.SeededAugmentation(self.train_set, cfg.seed)
        stream = self._batch_stream(dataset)
        accum, nonfinite = cfg.grad_accum, 0
        window = {"time": 0.0, "n": 0, "losses": {}}
        bar = tqdm(total=self.total_iters, initial=self.iteration, disable=not _is_main(), desc="train",
                   dynamic_ncols=True)
        self.ddp_model.train()
        t0 = time.perf_counter()
        while self.iteration < self.total_iters:
            # The step's batches are fetched first: the DETR normaliser counts the boxes of
            # all of them (on all processes), so accumulating grad_accum batches gives the
            # gradient of one grad_accum x larger batch (see _step_num_boxes).
            step = [next(stream) for _ in range(accum)]
            epoch = step[-1][0]
            skip_step = False
            with self.model.criterion.fixed_num_boxes(self._step_num_boxes([b for _, b in step])):
                for i, (_, (images, masks, targets)) in enumerate(step):
                    self.batches_done += 1
                    losses = self._forward_backward(images, masks, targets, accum, sync=i == accum - 1)
                    if losses is None:
                        skip_step = True
                    else:
                        for k, v in losses.items():
                            window["losses"][k] = window["losses"].get(k, 0.0) + v
            # A skipped step still counts, so the schedule stays aligned.
            if skip_step or not self._step():
                self.optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                if nonfinite >= cfg.max_nonfinite:
                    raise RuntimeError(f"{nonfinite} consecutive steps with non-finite losses or gradients: "
                                       f"training stopped; the last good checkpoint is {self.out_dir / 'last.pt'}")
            else:
                nonfinite = 0
            self.iteration += 1
            bar.update(1)
            window["time"] += time.perf_counter() - t0
            window["n"] += 1
            t0 = time.perf_counter()
            if self.iteration % cfg.log_every == 0 or self.iteration == self.total_iters:
                self._log_window(window, epoch)
                window = {"time": 0.0, "n": 0, "losses": {}}
            # An epoch ended within this step's batches (at its last one unless grad_accum
            # does not divide the epoch).
            epochs_done = self.batches_done // self.steps_per_epoch
            end_of_epoch = epochs_done > (self.batches_done - accum) // self.steps_per_epoch
            if (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0) or \
                    (end_of_epoch and not cfg.checkpoint_every):
                self.save()
            if end_of_epoch:
                self._callback("on_epoch_end", epochs_done)
            if end_of_epoch and cfg.eval_every and epochs_done % cfg.eval_every == 0 and \
                    self.iteration < self.total_iters:
                self.run_eval(epochs_done)
        stream.close()  # ends the current loader (and its workers)
        bar.close()
        self.run_eval(None)
        self.save()
        self._callback("on_train_end")
        return self.metrics

    def _batch_stream(self, dataset):
        """(epoch, batch) from batch ``batches_done`` on, across epochs, without end."""
        epoch, start = divmod(self.batches_done, self.steps_per_epoch)
        while True:
            yield from ((epoch, b) for b in data_lib.train_loader(
                dataset, self.batch_size, epoch, start, self.cfg.seed, self.cfg.num_workers,
                self.model_cfg.data.size_divisibility, self.rank, self.world_size))
            epoch, start = epoch + 1, 0

    def _step_num_boxes(self, batches: list) -> float:
        """The DETR normaliser of an optimizer step: its target boxes (over its batches and
        all processes) per batch and per process. Each batch's losses are sums over boxes
        divided by it, and the trainer divides them by grad_accum and DDP averages them over
        processes, so the step's gradient is (sum over all its boxes) / (all its boxes): that
        of a single batch holding all the step's images. That holds for the one-to-one
        losses (all of K=0); Co-DETR's auxiliary losses normalise by each batch's positives
        (see the README's training section)."""
        targets = [t for _, _, batch_targets in batches for t in batch_targets]
        return self.model.criterion.num_boxes(targets, self.device, num_batches=len(batches))

    def _forward_backward(self, images, masks, targets, accum: int, sync: bool) -> Optional[dict]:
        """One batch: forward, loss checks, backward (loss / accum). Returns the loss terms
        as floats, or None when the loss was not finite (nothing was backpropagated)."""
        images, masks = images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        ctx = self.ddp_model.no_sync() if (self.world_size > 1 and not sync) else _nullcontext()
        with ctx:
            with self._autocast():
                loss_dict = self.ddp_model(images, masks, targets)
            loss = sum(loss_dict.values())
            bad = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
            if self.world_size > 1:  # every rank must skip together
                flag = torch.tensor([float(bool(bad))], device=self.device)
                dist.all_reduce(flag)
                bad = bad or (["(another rank)"] if flag.item() else [])
            if bad:
                warnings.warn(f"iteration {self.iteration}: non-finite loss in {', '.join(bad)}; step skipped")
                return None
            self.scaler.scale(loss / accum).backward()
        return {k: float(v.detach()) for k, v in loss_dict.items()}

    def _step(self) -> bool:
        """The optimizer step; False (nothing updated) when a gradient is not finite."""
        f = self.lr_factor(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        clip = self.model_cfg.optim.grad_clip
        if clip:
            self.scaler.unscale_(self.optimizer)
        # The total norm also tells whether a gradient is not finite, with a finite loss (a
        # bf16 overflow, a faulty kernel): without fp16's GradScaler, which skips such steps
        # itself, one NaN would reach every weight through the clipping and Adam.
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            warnings.warn(f"iteration {self.iteration}: non-finite gradient of {len(bad)} parameters "
                          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) with a finite loss; step skipped")
            return False
        if clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        return True

    def _log_window(self, window: dict, epoch: int) -> None:
        n = max(window["n"], 1)
        terms = {k: v / (n * self.cfg.grad_accum) for k, v in window["losses"].items()}
        rec = {"iter": self.iteration, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "loss": sum(terms.values()), "time_per_iter": window["time"] / n, **terms}
        if self.device.type == "cuda":
            rec["max_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            rec["max_rss_mib"] = _max_rss_mib()
        self._log(rec)

    def run_eval(self, epoch: Optional[int]) -> dict:
        if self.val_set is None:
            return {}
        summary = {}
        if _is_main():  # the other ranks wait: evaluation is cheap next to training
            model = self.ema.module if self.ema else self.model
            summary = evaluate(model, self.val_set, self.device, batch_size=self.batch_size,
                               num_workers=self.cfg.num_workers,
                               size_divisibility=self.model_cfg.data.size_divisibility, amp=self.cfg.amp,
                               progress=True)
            self.metrics = summary
            self._log({"iter": self.iteration, "epoch": epoch, "eval": summary})
        if self.world_size > 1:
            dist.barrier()
        return summary


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: TrainConfig) -> dict:
    """Convenience: ``Trainer(cfg).train()``."""
    return Trainer(cfg).train()
