"""The quantizable units of a causal LM: every Linear inside its decoder layers (not the routers, embeddings or
the output head) and every expert slice of a fused transformers-5 experts module, with the structure plans select
on (layer, linear type, attention / MLP / expert / shared expert)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from patchlm.errors import PatchlmError
from patchlm.models.parts import is_fused_experts
from patchlm.quant.kind import EXPERT_PARTS

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # router linears stay in 16 bits


@dataclass(frozen=True)
class Unit:
    """One weight matrix to quantize. group: attn | mlp | experts | shared; expert: index within its layer."""

    name: str
    layer: int
    type: str
    group: str
    shape: tuple[int, int]
    expert: int | None = None
    experts_module: str | None = None

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, layers) of the decoder stack (model.model.layers for the Llama/Mistral/Gemma/Mixtral families)."""
    prefix = getattr(model, "base_model_prefix", "model")
    layers = getattr(getattr(model, prefix, None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PatchlmError(f"cannot find the decoder layers of {type(model).__name__} (expected .{prefix}.layers)")
    return f"{prefix}.layers", layers


def _group(name: str) -> str:
    if "shared_expert" in name:
        return "shared"
    if re.search(r"(^|\.)(self_attn|attention|attn)\.", name):
        return "attn"
    return "mlp"


def model_units(model: nn.Module) -> list[Unit]:
    """Every quantizable unit, in layer order."""
    prefix, layers = decoder_layers(model)
    out: list[Unit] = []
    for i, layer in enumerate(layers):
        for sub, mod in layer.named_modules():
            full = f"{prefix}.{i}.{sub}"
            leaf = sub.rsplit(".", 1)[-1]
            if isinstance(mod, nn.Linear) and leaf not in ROUTER_NAMES:
                out.append(Unit(full, i, leaf, _group(full), tuple(mod.weight.shape)))
            elif is_fused_experts(mod):
                for e in range(mod.gate_up_proj.shape[0]):
                    for part in EXPERT_PARTS:
                        w = getattr(mod, part)[e]
                        out.append(Unit(f"{full}.{e}.{part}", i, part, "shared" if "shared" in sub else "experts",
                                        tuple(w.shape), expert=e, experts_module=full))
    return out
