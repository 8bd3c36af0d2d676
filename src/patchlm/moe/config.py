"""Every knob of MoE upcycling and of the router-only training after it, with its default (written only here).

`patchlm moe upcycle` generates its options from these fields; a mergekit-moe YAML maps onto them
(gate_mode, experts_per_token -> top_k, dtype) and its per-expert fields (prompts, noise_scale, residual_scale)
onto the experts themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError
from patchlm.typed import check_fields

# mergekit-moe's gate modes: hidden (= hidden_last), hidden_avg, cheap_embed, random (unscaled randn),
# uniform_random (U(+-1/sqrt(h)), torch.nn.Linear's default init)
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
PROMPTED = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # the modes that read prompts
SHARED = ("base", "average")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MoeConfig:
    """How experts, routers and the rest of the upcycled Mixtral are built, and how its routers train."""

    gate_mode: str = field(default="hidden", metadata={
        "help": "router init (mergekit-moe's): hidden | cheap_embed | random | uniform_random (also hidden_avg)"})
    top_k: int = field(default=2, metadata={"help": "experts per token (mergekit-moe's experts_per_token)"})
    shared: str = field(default="base", metadata={
        "help": "attention, norms and embeddings: from the base (base) or averaged over the specialists (average)"})
    router_jitter: float = field(default=0.0, metadata={
        "help": "router jitter noise while training (Mixtral's router_jitter_noise: inputs scaled by U(1-j, 1+j))"})
    expert_noise: float = field(default=0.0, metadata={
        "help": "std of Gaussian noise added to every expert weight (mergekit-moe's noise_scale; 0: none)"})
    prompts_per_task: int = field(default=8, metadata={
        "help": "positive prompts taken from a specialist's training task when none are given"})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype of the written checkpoint: float32 | bfloat16 | float16 (none: the base's)"})
    seed: int = field(default=0, metadata={"help": "seed of random gates, expert noise and router training"})
    router_steps: int = field(default=0, metadata={
        "help": "router-only training steps on the specialists' mixed training data (0: no training)"})
    router_lr: float = field(default=1e-3, metadata={"help": "router training: AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "router training: examples per step"})
    max_length: int = field(default=128, metadata={"help": "router training and prompts: max tokens per example"})
    bf16: bool = field(default=False, metadata={"help": "router training: bf16 autocast"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.gate_mode not in GATE_MODES:
            raise ConfigError(f"unknown gate mode {self.gate_mode!r}; choices: {', '.join(GATE_MODES)}",
                              field="gate_mode")
        if self.shared not in SHARED:
            raise ConfigError(f"shared {self.shared!r}: choose base or average", field="shared")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose {', '.join(DTYPES)}", field="dtype")
        for name in ("top_k", "prompts_per_task", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        for name in ("router_jitter", "expert_noise", "router_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", field=name)
        if self.router_jitter >= 1:
            raise ConfigError(f"router_jitter must be below 1, got {self.router_jitter}", field="router_jitter")
        if self.router_lr <= 0:
            raise ConfigError(f"router_lr must be positive, got {self.router_lr}", field="router_lr")
