"""Where the parts of a causal LM are: its backbone (the decoder stack) and its output head."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(backbone, head) when the head can be run on chosen positions only, else (None, None).

    A model whose logits are post-processed (Gemma's final_logit_softcapping) must run its own forward, so it
    gets (None, None): running the head alone would skip the softcap and give other logits.
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "final_logit_softcapping", None):
        return None, None
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        return None, None
    return backbone, head


def is_fused_experts(mod: torch.nn.Module) -> bool:
    """A transformers-5 fused experts module: 3-D gate_up_proj and down_proj parameters."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on the device's type when asked, else a no-op context (the one autocast rule)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(kind, dtype=torch.bfloat16) if bf16 else nullcontext()
