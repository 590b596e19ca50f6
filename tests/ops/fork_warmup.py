"""Imported by the forkserver of tests/ops/malformed_cases.py before it forks any case: the
first FakeTensorMode and the first symbolic size cost about 1.5 s of lazy initialisation,
paid here once instead of in every case's process."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import codetr.ops

_mode = FakeTensorMode(shape_env=ShapeEnv())
_boxes = _mode.from_tensor(torch.rand(3, 4), static_shapes=True)
with _mode:
    codetr.ops.nms(_boxes, _boxes[:, 0], 0.5)
