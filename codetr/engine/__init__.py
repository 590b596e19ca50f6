"""Training engine: Trainer, checkpoints, evaluation."""
from .checkpoint import load_checkpoint, load_model_state, load_pretrained, save_checkpoint
from .evaluate import evaluate
from .trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "evaluate", "load_checkpoint", "load_model_state", "load_pretrained",
           "save_checkpoint", "train"]
