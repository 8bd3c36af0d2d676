"""`SelectConfig`: every knob of data selection (SHED and the baseline selectors) with its default and help text.

The `patchlm select` options, `select_subset()` and the benchmark all read their defaults from these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean
from patchlm.typed import check_fields

METHODS = ("shed", "random", "full", "perplexity", "kcenter", "knn-shapley")
UTILITIES = ("lora", "probe", "coverage")
SAMPLERS = ("qocs", "qwcs")
PERPLEXITY_KEEP = ("low", "middle", "high")


@dataclass
class SelectConfig:
    """Which selector, the budget, the embeddings and SHED's clustering, Shapley estimate, utility and sampler."""

    method: str = field(default="shed", metadata={
        "help": "selector: shed | random | full | perplexity | kcenter | knn-shapley"})
    model: str = field(default="smollm2-135m", metadata={
        "help": "base model of the lora utility and of perplexity filtering", "short": "-m"})
    fraction: float = field(default=0.1, metadata={"help": "budget as a fraction of the training pool (0, 1]"})
    count: int | None = field(default=None, metadata={"help": "budget as a number of examples (overrides fraction)"})
    seed: int = field(default=0, metadata={"help": "seed of the data split, KMeans, permutations and sampling"})
    embedder: str = field(default="minilm-l6", metadata={"help": "sentence encoder for the embeddings"})
    embed_batch_size: int = field(default=64, metadata={"help": "texts per encoder forward pass"})
    embed_max_length: int = field(default=256, metadata={"help": "max tokens per embedded text"})
    clusters: int = field(default=100, metadata={"help": "SHED: KMeans clusters (= proxies)"})
    utility: str = field(default="lora", metadata={
        "help": "SHED utility: lora (train LoRA on the proxies, score on validation) | probe (logistic regression "
                "on the embeddings, classification) | coverage (validation similarity to the proxies)"})
    permutations: int = field(default=5, metadata={"help": "SHED: Monte-Carlo permutations of the proxies"})
    group_size: int = field(default=10, metadata={"help": "SHED: proxies removed together per round"})
    sampler: str = field(default="qocs", metadata={
        "help": "SHED: qocs (clusters in order of value) | qwcs (clusters drawn with p ~ exp(beta x value))"})
    beta: float = field(default=1.0, metadata={
        "help": "SHED qwcs: temperature on the values (standardised by their standard deviation)"})
    val_limit: int = field(default=200, metadata={
        "help": "validation examples the utilities and knn-shapley score on"})
    lora_rank: int = field(default=8, metadata={"help": "lora utility: LoRA rank"})
    lora_epochs: float = field(default=2.0, metadata={"help": "lora utility: epochs over the proxy set"})
    lora_lr: float = field(default=1e-3, metadata={"help": "lora utility: learning rate"})
    batch_size: int = field(default=8, metadata={"help": "lora utility and perplexity: examples per batch"})
    max_length: int = field(default=128, metadata={"help": "lora utility and perplexity: max tokens per example"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the base model's passes"})
    perplexity_keep: str = field(default="low", metadata={
        "help": "perplexity: keep the low | middle | high perplexity examples"})
    knn_k: int = field(default=5, metadata={"help": "knn-shapley: neighbours K"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        check_fields(self)
        for name, choices in (("method", METHODS), ("utility", UTILITIES), ("sampler", SAMPLERS),
                              ("perplexity_keep", PERPLEXITY_KEEP)):
            value = getattr(self, name)
            if value not in choices:
                what = {"method": "selection method", "perplexity_keep": "perplexity_keep value"}.get(name, name)
                raise UnknownNameError(f"unknown {what} {value!r}; {did_you_mean(value, choices)}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}", field="fraction")
        if self.count is not None and self.count <= 0:
            raise ConfigError(f"count must be positive, got {self.count}", field="count")
        for name in ("embed_batch_size", "embed_max_length", "clusters", "permutations", "group_size", "val_limit",
                     "lora_rank", "batch_size", "max_length", "knn_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        for name in ("lora_epochs", "lora_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)

    def budget(self, pool: int) -> int:
        """The number of examples to select from a pool of `pool` (count, else round(fraction x pool), >= 1)."""
        if self.count is not None:
            if self.count > pool:
                raise ConfigError(f"count {self.count} is larger than the training pool ({pool} examples)",
                                  field="count")
            return self.count
        return max(1, min(pool, round(self.fraction * pool)))

    def to_dict(self) -> dict:
        return asdict(self)
