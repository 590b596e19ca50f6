"""Run by tests/engine/test_trainer.py under torchrun: for each json file of TrainConfig
fields given, train, then every rank saves its weights to <out_dir>/rank<r>.pt (the
Trainer itself writes on rank 0 only)."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codetr.engine import TrainConfig, Trainer

torch.set_num_threads(1)  # 2 processes on a shared 2-core machine
for path in sys.argv[1:]:
    trainer = Trainer(TrainConfig(**json.loads(Path(path).read_text())))
    trainer.train()
    torch.save(trainer.model.state_dict(), Path(trainer.cfg.out_dir) / f"rank{trainer.rank}.pt")
dist.destroy_process_group()
