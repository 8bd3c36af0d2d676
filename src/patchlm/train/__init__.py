"""The engine: the one training loop (engine), step rules (optim, zo), checkpoints, and the patch Trainer."""

import patchlm.train.newton  # registers the Newton step rule
import patchlm.train.zo  # noqa: F401  (registers the zeroth-order step rules)
from patchlm.train.config import TrainConfig
from patchlm.train.trainer import Trainer, train_patch

__all__ = ["TrainConfig", "Trainer", "train_patch"]
