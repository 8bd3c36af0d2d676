"""`RouteConfig`: every knob of routing over a patch library (GLIDER, Phatgoose gates, Arrow, the baselines).

The `patchlm route` options, the library functions and bench/route.py read their defaults from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean
from patchlm.typed import check_fields

# glider: global + local; glider-global: the instruction router alone (sequence level); glider-local = phatgoose
ROUTERS = ("glider", "glider-global", "glider-local", "phatgoose", "arrow", "merged", "uniform", "best", "oracle",
           "base")
LEVELS = ("token", "sequence")
GLOBAL_FROM = ("instruction", "input")
DISPATCHES = ("auto", "split", "dense")


@dataclass
class RouteConfig:
    """How a library is routed: the router, top-k, the level, GLIDER's global part, gate training, evaluation."""

    router: str = field(default="glider", metadata={
        "help": "glider | glider-global | glider-local | phatgoose | arrow | merged | uniform | best | oracle | base"})
    top_k: int = field(default=2, metadata={"help": "experts per token (or sequence), weights renormalised"})
    level: str = field(default="token", metadata={
        "help": "token (a choice per token and module) | sequence (one choice per sequence and module)"})
    dispatch: str = field(default="auto", metadata={
        "help": "routed modules: split (each expert runs on its own tokens only) | dense (every expert's stacked "
                "factors on every token, weighted: two matmuls, no gather) | auto (dense when the stacked factors "
                "cost at most the base matmul)"})
    global_scale: float = field(default=100.0, metadata={
        "help": "GLIDER: scale x cosine(query instruction, expert instruction) added to the local logits"})
    global_from: str = field(default="instruction", metadata={
        "help": "GLIDER's global embedding: instruction (the base model writes one per expert and per query, as the "
                "paper) | input (embed the raw query and the expert's examples: cheaper)"})
    embedder: str = field(default="minilm-l6", metadata={"help": "sentence encoder of the global router"})
    instruction_examples: int = field(default=3, metadata={
        "help": "GLIDER: expert examples shown to the base model when it writes the expert's instruction"})
    instruction_tokens: int = field(default=24, metadata={"help": "GLIDER: max new tokens of an instruction"})
    instruction_chars: int = field(default=400, metadata={"help": "GLIDER: characters of each input shown"})
    gate_steps: int = field(default=100, metadata={"help": "Phatgoose: gate training steps per expert"})
    gate_lr: float = field(default=5e-3, metadata={"help": "Phatgoose: gate learning rate (AdamW, no decay)"})
    gate_batch_size: int = field(default=8, metadata={"help": "Phatgoose: examples per gate training step"})
    gate_max_length: int = field(default=192, metadata={"help": "Phatgoose: max tokens per training example"})
    arrow_temperature: float = field(default=1.0, metadata={"help": "Arrow: router temperature (PEFT ArrowConfig)"})
    merge_method: str = field(default="ties", metadata={
        "help": "merged baseline: merge method (the merging study's best)"})
    merge_density: float = field(default=0.5, metadata={"help": "merged baseline: density of ties/dare merges"})
    batch_size: int = field(default=16, metadata={"help": "evaluation: sequences per forward pass"})
    max_length: int = field(default=256, metadata={"help": "evaluation: max prompt tokens"})
    limit: int | None = field(default=100, metadata={"help": "evaluation: test examples per task"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    seed: int = field(default=0, metadata={"help": "data split and gate-training seed"})

    def __post_init__(self):
        check_fields(self)
        for name, choices in (("router", ROUTERS), ("level", LEVELS), ("global_from", GLOBAL_FROM),
                              ("dispatch", DISPATCHES)):
            value = getattr(self, name)
            if value not in choices:
                raise UnknownNameError(f"unknown {name} {value!r}; {did_you_mean(value, choices)}")
        for name in ("top_k", "instruction_examples", "instruction_tokens", "instruction_chars", "gate_steps",
                     "gate_batch_size", "gate_max_length", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be positive, got {self.limit}", field="limit")
        for name in ("gate_lr", "arrow_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.global_scale < 0:
            raise ConfigError(f"global_scale must be >= 0, got {self.global_scale}", field="global_scale")
        if not 0 < self.merge_density <= 1:
            raise ConfigError(f"merge_density must be in (0, 1], got {self.merge_density}", field="merge_density")
