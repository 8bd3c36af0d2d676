"""What an evaluation measures and how: one config the CLI's `patchlm eval` and the library's evaluate() share."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError
from patchlm.typed import check_fields


@dataclass
class EvalConfig:
    """What `patchlm eval` measures and how; evaluate(), evaluate_classification() and label_scores() take their
    defaults from these fields."""

    split: str = field(default="test", metadata={"help": "train | validation | test"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples of the split"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_length: int = field(default=512, metadata={"help": "max tokens per example"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    seed: int = field(default=0, metadata={"help": "data split seed"})

    def __post_init__(self):
        check_fields(self)
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be positive, got {self.limit}", field="limit")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
