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


# MC-SMoE (patchlm.moe.mcsmoe, `patchlm moe compress`)
SIMILARITIES = ("router-logits", "weight")
MERGE_WEIGHTS = ("usage", "uniform")
METHODS = ("merge", "prune")
LAYER_GROUPS = ("uniform", "adaptive")
ROUTER_ROWS = ("dominant", "weighted")


@dataclass
class CompressConfig:
    """MC-SMoE: routing statistics, alignment, grouping, merging, low-rank + sparse compression, recovery."""

    groups: int | None = field(default=None, metadata={
        "help": "experts per layer after merging (average per layer with --layer-groups adaptive; none: no merge)"})
    keep: float | None = field(default=None, metadata={
        "help": "fraction of the experts kept after merging, in (0, 1] (instead of --groups)"})
    layer_groups: str = field(default="uniform", metadata={
        "help": "uniform (every layer --groups; the checkpoint really shrinks) | adaptive (one global usage "
                "threshold gives each layer its own count; layers padded to the largest count, as Mixtral has one "
                "expert count)"})
    method: str = field(default="merge", metadata={
        "help": "merge (each group becomes one expert) | prune (baseline: keep the most used experts, drop the rest)"})
    merge_weights: str = field(default="usage", metadata={
        "help": "usage (average weighted by routing frequency, M-SMoE) | uniform (plain average, a baseline)"})
    align: bool = field(default=True, metadata={
        "help": "permute each expert's neurons to its group's dominant expert before merging (weight matching)"})
    similarity: str = field(default="router-logits", metadata={
        "help": "expert similarity for grouping: router-logits (cosine of logit columns over tokens) | weight"})
    router_rows: str = field(default="dominant", metadata={
        "help": "router row of a merged expert: dominant (the dominant expert's row) | weighted (usage-weighted "
                "mean of its members' rows)"})
    allow_unused: bool = field(default=False, metadata={
        "help": "accept calibration data that routes no token to an expert: it joins its most similar dominant "
                "expert with merge weight 0 (its weights are dropped)"})
    calib_examples: int = field(default=64, metadata={
        "help": "calibration examples per task (routing statistics, one-shot pruning importance)"})
    low_rank: int = field(default=0, metadata={
        "help": "rank of each merged expert matrix's low-rank part (SVD; 0: none)"})
    sparsity: float = field(default=0.0, metadata={
        "help": "fraction of the sparse part's entries pruned, in [0, 1] (1 with --low-rank: low rank alone)"})
    importance_beta: float = field(default=0.85, metadata={
        "help": "EMA factor of the |weight x gradient| pruning importance during recovery (LoSparse's beta)"})
    prune_end: float = field(default=0.7, metadata={
        "help": "fraction of the recovery steps at which the cubic sparsity schedule reaches --sparsity"})
    recover: int = field(default=0, metadata={
        "help": "recovery steps: distillation from the uncompressed MoE, routers and experts trainable (0: none)"})
    lr: float = field(default=1e-4, metadata={"help": "recovery: AdamW learning rate"})
    kd_weight: float = field(default=0.2, metadata={"help": "recovery: weight of the KL term (loss = CE + w KL)"})
    temperature: float = field(default=2.0, metadata={"help": "recovery: distillation temperature"})
    batch_size: int = field(default=8, metadata={"help": "calibration and recovery: examples per batch"})
    max_length: int = field(default=128, metadata={"help": "calibration and recovery: max tokens per example"})
    seed: int = field(default=0, metadata={"help": "seed of the recovery data order"})
    bf16: bool = field(default=False, metadata={"help": "recovery: bf16 autocast"})

    def __post_init__(self) -> None:
        check_fields(self)
        for name, allowed in (("layer_groups", LAYER_GROUPS), ("method", METHODS), ("merge_weights", MERGE_WEIGHTS),
                              ("similarity", SIMILARITIES), ("router_rows", ROUTER_ROWS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r}: choose {' | '.join(allowed)}", field=name)
        if self.groups is not None and self.keep is not None:
            raise ConfigError("give groups or keep, not both", field="keep")
        if self.groups is not None and self.groups < 1:
            raise ConfigError(f"groups must be at least 1, got {self.groups}", field="groups")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}", field="keep")
        if self.low_rank < 0:
            raise ConfigError(f"low_rank must be >= 0, got {self.low_rank}", field="low_rank")
        if not 0 <= self.sparsity <= 1:
            raise ConfigError(f"sparsity must be in [0, 1], got {self.sparsity}", field="sparsity")
        if self.low_rank > 0 and self.sparsity == 0:
            raise ConfigError(f"low_rank {self.low_rank} with sparsity 0 keeps a dense residual beside the low-rank "
                              "part: the expert grows; give a sparsity above 0", field="sparsity")
        for name in ("calib_examples", "batch_size", "max_length", "temperature", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.recover < 0:
            raise ConfigError(f"recover must be >= 0, got {self.recover}", field="recover")
        if self.kd_weight < 0:
            raise ConfigError(f"kd_weight must be >= 0, got {self.kd_weight}", field="kd_weight")
        if not 0 <= self.importance_beta < 1:
            raise ConfigError(f"importance_beta must be in [0, 1), got {self.importance_beta}", field="importance_beta")
        if not 0 < self.prune_end <= 1:
            raise ConfigError(f"prune_end must be in (0, 1], got {self.prune_end}", field="prune_end")

    @property
    def compresses(self) -> bool:
        return self.low_rank > 0 or self.sparsity > 0
