"""Choose linear modules by name or preset, and swap them for wrapper modules (and back)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from patchlm.errors import UnknownNameError, did_you_mean

# Leaf names per preset; Llama/Mistral/Qwen/Gemma-style names first, GPT-2/BERT-style after.
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3"),
    "qv": ("q_proj", "v_proj", "query", "value"),
}
EXCLUDED = ("lm_head", "embed_out", "output_layer", "score", "classifier")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model except output heads."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] not in EXCLUDED}


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the linear modules chosen by `targets`.

    `targets` is a preset (`attn`, `mlp`, `qv`, `all-linear`), a comma-separated string or list of leaf
    names (`q_proj`) or full module names, or `re:<regex>` matched against full names.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if not targets:
        raise UnknownNameError("no target modules given; use a preset (attn, mlp, all-linear) or module names")
    linears = linear_modules(model)
    leaf_names = {n.split(".")[-1] for n in linears}
    chosen: set[str] = set()
    for t in targets:
        if t == "all-linear":
            chosen.update(linears)
        elif t in PRESETS:
            hit = {n for n in linears if n.split(".")[-1] in PRESETS[t]}
            if not hit:
                raise UnknownNameError(f"preset {t!r} matches no linear module of this model; "
                                       f"its linear modules are: {', '.join(sorted(leaf_names))}")
            chosen.update(hit)
        elif t.startswith("re:"):
            rx = re.compile(t[3:])
            hit = {n for n in linears if rx.search(n)}
            if not hit:
                raise UnknownNameError(f"regex {t[3:]!r} matches no linear module")
            chosen.update(hit)
        elif t in linears:
            chosen.add(t)
        elif t in leaf_names:
            chosen.update(n for n in linears if n.split(".")[-1] == t)
        else:
            raise UnknownNameError(f"unknown target module {t!r}; "
                                   f"{did_you_mean(t, [*sorted(leaf_names), 'attn', 'mlp', 'qv', 'all-linear'])}")
    return sorted(chosen, key=_natural_key)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def has_module(model: nn.Module, name: str) -> bool:
    """Whether the model has a submodule with this full name."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_modules(model: nn.Module, names: Iterable[str], factory: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named module by factory(name, module), in the train/eval mode of the module it replaces (a
    patch applied to a model in eval mode must not run its dropout)."""
    for name in names:
        parent, child = get_parent(model, name)
        old = getattr(parent, child)
        new = factory(name, old)
        new.train(old.training)
        setattr(parent, child, new)


def wrapped_modules(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    """Name -> module for every module of type `cls` (the wrappers an adapter installed)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def unwrap_modules(model: nn.Module, cls: type) -> None:
    """Put every wrapper of type `cls` back to the module it wraps (its `.base`)."""
    for name, mod in list(wrapped_modules(model, cls).items()):
        parent, child = get_parent(model, name)
        setattr(parent, child, mod.base)
