"""The knobs of a merge run that are not merge-method parameters (those come from each method's signature).

`patchlm merge` generates its options from these fields, so each default is written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError
from patchlm.typed import check_fields

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str | int, field_name: str = "shard_size") -> int:
    """Bytes from '2GiB' (binary: KiB, MiB, GiB, TiB = powers of 1024), '500MB' / '2G' (decimal) or '1000000'."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        t = str(text).strip().upper().removesuffix("B")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if u and t.endswith(u)), "")
        try:
            n = int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
        except ValueError as e:
            raise ConfigError(f"{field_name} {text!r}: expected a size such as 2GiB, 500MB or 1000000 (bytes)",
                              field=field_name) from e
    if n <= 0:
        raise ConfigError(f"{field_name} must be positive, got {text!r}", field=field_name)
    return n


@dataclass
class MergeConfig:
    """How `patchlm merge` runs: the output of patch merges, Fisher estimation, checkpoint shards."""

    rank: int | None = field(default=None, metadata={
        "help": "patches: re-factorize the merge to a rank-r LoRA by truncated SVD (none: keep dense deltas)"})
    stack: bool = field(default=True, metadata={
        "help": "patches: linear / task_arithmetic of LoRAs as one exact stacked LoRA"})
    fisher_examples: int = field(default=32, metadata={
        "help": "patches, fisher: training examples per Fisher estimate (one backward pass each)"})
    bf16: bool = field(default=False, metadata={"help": "patches, fisher: bf16 autocast for the Fisher estimate"})
    shard_size: str = field(default="2GiB", metadata={
        "help": "checkpoints: max bytes per safetensors shard; GiB/MiB are binary (2^30, 2^20), GB/MB decimal"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}", field="rank")
        if isinstance(self.fisher_examples, bool) or not isinstance(self.fisher_examples, int) \
                or self.fisher_examples <= 0:
            raise ConfigError(f"fisher_examples must be a positive integer, got {self.fisher_examples!r}",
                              field="fisher_examples")
        parse_size(self.shard_size)

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


DEFAULT_SHARD_BYTES = parse_size(MergeConfig.shard_size)
