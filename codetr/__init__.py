"""codetr: Co-DETR (DETRs with Collaborative Hybrid Assignments Training) in PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the compiled extension, or warns once)
from .config import build_model, get_preset  # noqa: E402


def train(cfg):
    """Train with a ``codetr.engine.TrainConfig`` (see ``codetr.engine.Trainer``)."""
    from .engine import train as _train

    return _train(cfg)


__all__ = ["ops", "build_model", "get_preset", "train", "__version__"]
