"""Typed configs of the depth tools: `DropConfig` (LLM-Drop plans and their calibration) and `SkipConfig`
(MindSkip router training). Every default and help text is written here once; the CLI options of
`patchlm drop` and `patchlm skip train`, the library functions' defaults and the benchmark read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean
from patchlm.typed import check_fields

METHODS = ("one-shot", "iterative", "joint", "consecutive")
GRANULARITIES = ("sequence", "token")


@dataclass
class DropConfig:
    """Which modules to drop and how to score them (calibration text, its size, the scoring forward passes)."""

    method: str = field(default="one-shot", metadata={
        "help": "one-shot | iterative | joint | consecutive (baseline)"})
    attn: int = field(default=0, metadata={"help": "attention modules to drop"})
    mlp: int = field(default=0, metadata={"help": "MLP modules to drop"})
    blocks: int = field(default=0, metadata={"help": "whole blocks to drop"})
    modules: int = field(default=0, metadata={
        "help": "joint method: modules to drop, attention and MLP ranked together"})
    calib: str = field(default="news_corpus", metadata={"help": "calibration task (its train split text)"})
    samples: int = field(default=32, metadata={"help": "calibration blocks"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration block"})
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass while scoring"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast while scoring"})

    def __post_init__(self):
        check_fields(self)
        if self.method not in METHODS:
            raise UnknownNameError(f"unknown drop method {self.method!r}; {did_you_mean(self.method, METHODS)}")
        for name in ("attn", "mlp", "blocks", "modules"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}", field=name)
        for name in ("samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}", field="seq_len")


@dataclass
class SkipConfig:
    """MindSkip router training: data, the capacity term, AdamW on the routers only, routed layers, checkpoints."""

    samples: int = field(default=1000, metadata={"help": "training samples (one epoch over them)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    max_length: int = field(default=256, metadata={"help": "max tokens per sample"})
    lr: float = field(default=1e-3, metadata={"help": "router learning rate (AdamW, no weight decay)"})
    lam: float = field(default=1.0, metadata={"help": "weight of the capacity term (lambda)"})
    target: float | None = field(default=None, metadata={
        "help": "capacity target: penalise relu(mean(m) - target) instead of mean(m)"})
    epochs: int = field(default=1, metadata={"help": "passes over the samples"})
    seed: int = field(default=0, metadata={"help": "seed for the data order"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    granularity: str = field(default="sequence", metadata={
        "help": "sequence (real skipping) | token (masked study variant)"})
    last: int | None = field(default=None, metadata={
        "help": "route the last N layers but the final one (default: half the layers)"})
    save_every: int = field(default=25, metadata={"help": "checkpoint the routers every N steps"})

    def __post_init__(self):
        check_fields(self)
        for name in ("samples", "batch_size", "max_length", "epochs", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}", field="lr")
        if self.lam < 0:
            raise ConfigError(f"lam (the capacity weight lambda) must not be negative, got {self.lam}", field="lam")
        if self.target is not None and not 0.0 <= self.target <= 1.0:
            raise ConfigError(f"capacity target must be in [0, 1], got {self.target}", field="target")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown router granularity {self.granularity!r}; choices: {', '.join(GRANULARITIES)}",
                              field="granularity")
