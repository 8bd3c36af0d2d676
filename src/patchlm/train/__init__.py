"""Training patches: objectives (classification, LM, chat), the trainer loop, checkpoints and resume."""

from patchlm.train.config import TrainConfig
from patchlm.train.trainer import Trainer, train_patch

__all__ = ["TrainConfig", "Trainer", "train_patch"]
