"""Adapters: module targeting, LoRA (and later MoS), PEFT import/export."""

from patchlm.adapters.inject import PRESETS, resolve_targets
from patchlm.adapters.lora import LoraKind, LoraLinear, lora_delta, merge_lora, unmerge_lora

__all__ = ["PRESETS", "resolve_targets", "LoraKind", "LoraLinear", "lora_delta", "merge_lora", "unmerge_lora"]
