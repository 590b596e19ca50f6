"""Checkpoints: atomic writes, weights_only loads, clear errors on mismatched models."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from torch import nn


def save_checkpoint(state: dict, path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync,
    then rename, so a crash while saving leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _numpy_globals() -> list:
    """numpy's array / scalar / dtype constructors, under their numpy 2 and numpy 1 names:
    data only, no code (mmdetection checkpoints keep numpy values in their "meta")."""
    import numpy as np

    core = np._core.multiarray
    objs = [core.scalar, core._reconstruct, np.ndarray, np.dtype,
            *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]
    return objs + [(core.scalar, "numpy.core.multiarray.scalar"),
                   (core._reconstruct, "numpy.core.multiarray._reconstruct")]


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """torch.load with weights_only=True (no pickled code runs), numpy arrays and scalars
    allowed (other implementations' checkpoints hold them); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


def load_model_state(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load whose error names the missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        def head(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        parts = [f"{name}: {head(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise RuntimeError(f"{source} does not match the model (another configuration?): " + "; ".join(parts))
    model.load_state_dict(state_dict)


def load_pretrained(model: nn.Module, path: Union[str, Path]) -> list[str]:
    """Load a checkpoint's weights for fine-tuning: parameters whose shape differs (the
    classifiers when the class count changed) keep their initialisation. Returns the
    skipped keys (also missing / unexpected ones)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted((set(own) | set(state)) - set(usable))
    model.load_state_dict(usable, strict=False)
    return skipped
