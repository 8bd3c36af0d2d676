"""Which model families the depth tools know, and where their decoder layers and sub-layer norms live.

Scoring only needs hook points (the residual input of each sub-layer), so it works on every family below.
Dropping and routing replace the decoder layer's forward; they need a pre-norm layer of the Llama shape
(norm -> attention -> add, norm -> MLP -> add) and a cache without sliding-window layer types.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from patchlm.errors import ConfigError, PatchlmError


class UnsupportedModelError(PatchlmError):
    """The model family has no known hook points for scoring, dropping or routing."""


@dataclass(frozen=True)
class Family:
    attn_norm: str   # norm in front of the attention (belongs to the attention sub-layer)
    mlp_norm: str    # the module whose *input* is the residual stream in front of the MLP sub-layer
    mlp_parts: tuple[str, ...]   # modules of the MLP sub-layer (stashed when the MLP is dropped)
    attn_parts: tuple[str, ...]  # modules of the attention sub-layer
    can_drop: bool   # the generic Llama-shaped forward is exact for this family


_LLAMA = Family("input_layernorm", "post_attention_layernorm", ("post_attention_layernorm", "mlp"),
                ("input_layernorm", "self_attn"), True)
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    # Gemma3 adds post-norms and sliding-window layers: scores work (hooks), dropping/routing do not.
    "Gemma3ForCausalLM": Family("input_layernorm", "pre_feedforward_layernorm",
                                ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
                                ("input_layernorm", "self_attn", "post_attention_layernorm"), False),
}


def architecture(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def family(model: nn.Module, for_what: str = "scoring") -> Family:
    """The family entry of `model`, refusing families that cannot do `for_what` (scoring, dropping, routing)."""
    arch = architecture(model)
    fam = FAMILIES.get(arch)
    ok = sorted(FAMILIES) if for_what == "scoring" else sorted(a for a, f in FAMILIES.items() if f.can_drop)
    if fam is None or arch not in ok:
        raise UnsupportedModelError(f"{for_what} is not supported for {arch}; supported: {', '.join(ok)}")
    if for_what != "scoring":
        types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise UnsupportedModelError(
                f"{for_what} is not supported for {arch} with sliding-window layers ({', '.join(sorted(types))}); "
                "supported: models whose layers all use full attention")
    return fam


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (model.model.layers for every supported family)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"cannot find the decoder layers of {architecture(model)}; "
                                    f"supported: {', '.join(sorted(FAMILIES))}")
    return layers


def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", "model"))


def check_indices(idx, num_layers: int, what: str) -> list[int]:
    """Sorted unique layer indices, each in [0, num_layers)."""
    out = sorted({int(i) for i in idx})
    bad = [i for i in out if i < 0 or i >= num_layers]
    if bad:
        raise ConfigError(f"{what} layer index {bad[0]} is out of range: this model has {num_layers} layers "
                          f"(0..{num_layers - 1})")
    return out
