"""Adapters: module targeting, LoRA, MoS, PEFT-backed VeRA and VB-LoRA, full fine-tuning, PEFT import/export.

Each method has a config dataclass (its spec, CLI options and recipe keys) and a patch kind."""

from patchlm.adapters.full import FullConfig, FullKind
from patchlm.adapters.inject import PRESETS, resolve_targets
from patchlm.adapters.lora import LoraConfig, LoraKind, LoraLinear, lora_delta, merge_lora, unmerge_lora
from patchlm.adapters.mos import MosConfig, MosKind
from patchlm.adapters.prefix import PrefixConfig, PrefixKind
from patchlm.adapters.prompt import PromptConfig, PromptKind
from patchlm.adapters.vblora import VBLoraConfig, VBLoraKind
from patchlm.adapters.vera import VeraConfig, VeraKind

# method name -> its config dataclass (the kind of the same name trains it)
METHOD_CONFIGS: dict[str, type] = {"lora": LoraConfig, "mos": MosConfig, "vera": VeraConfig,
                                   "vblora": VBLoraConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
                                   "full": FullConfig}

__all__ = ["METHOD_CONFIGS", "PRESETS", "FullConfig", "FullKind", "LoraConfig", "LoraKind", "LoraLinear", "MosConfig",
           "MosKind", "PrefixConfig", "PrefixKind", "PromptConfig", "PromptKind",
           "VBLoraConfig", "VBLoraKind", "VeraConfig", "VeraKind", "lora_delta", "merge_lora", "resolve_targets",
           "unmerge_lora"]
