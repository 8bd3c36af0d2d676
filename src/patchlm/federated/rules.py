"""Aggregation rules for federated LoRA, as pure functions over client updates.

A client update is a LoRA adapter (per module A: r_k x d_in, B: d_out x r_k, scaling s_k = alpha_k / r_k) and its
data size n_k; p_k = n_k / sum_j n_j. Each rule returns a global LoRA (per module A_g, B_g) whose scaling is 1:
client scalings and weights are folded into the tensors, so dW_g = B_g A_g.

- flora:   A_g = rows of (p_k s_k A_k) stacked, B_g = columns of B_k stacked: B_g A_g = sum_k p_k s_k B_k A_k
           exactly, for any mix of ranks (FLoRA, NeurIPS 2024). Global rank = sum_k r_k.
- fedit:   A_g = sum p_k A_k, B_g = sum p_k s_k B_k (FedIT: average A and B separately). Its product has the
           cross terms p_k p_j B_k A_j (aggregation noise); mixed ranks do not fit and are refused.
- zeropad: pad every A_k / B_k with zero rows / columns to the largest rank, then average as fedit.
- ffa:     FFA-LoRA: A is frozen and shared (A_k the first r_k rows of one seeded matrix), B is averaged
           (zero-padded): exact whenever A really is shared, which the rule checks.

`aggregation_error` measures ||dW_g - sum_k p_k dW_k|| / ||sum_k p_k dW_k|| over all modules (Frobenius).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patchlm.errors import ConfigError, PatchFormatError, UnknownNameError, did_you_mean


@dataclass
class ClientUpdate:
    """One client's LoRA adapter: module -> (A, B), its scaling alpha/r, and its data size."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    num_samples: int
    client_id: str = ""

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.modules.values()}

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.modules[name]
        return (b.double() @ a.double()) * self.scaling


@dataclass
class GlobalLoRA:
    """The aggregated adapter: module -> (A_g, B_g) with scaling 1 (dW = B_g A_g)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rule: str
    weights: list[float] = field(default_factory=list)
    scaling: float = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors in the LoRA patch layout (`<module>.lora_A` / `.lora_B`)."""
        out = {}
        for n, (a, b) in self.modules.items():
            out[f"{n}.lora_A"] = a.float().contiguous()
            out[f"{n}.lora_B"] = b.float().contiguous()
        return out

    def delta(self, name: str) -> torch.Tensor:
        a, b = self.modules[name]
        return (b.double() @ a.double()) * self.scaling

    @property
    def rank(self) -> dict[str, int]:
        return {n: a.shape[0] for n, (a, _) in self.modules.items()}


def update_from_tensors(tensors: dict[str, torch.Tensor], scaling: float, num_samples: int,
                        client_id: str = "") -> ClientUpdate:
    """A ClientUpdate from LoRA patch tensors (`<module>.lora_A`, `<module>.lora_B`)."""
    from patchlm.adapters.lora import lora_modules_from_tensors

    if num_samples is None or int(num_samples) <= 0:
        raise ConfigError(f"client {client_id or '?'} reports num_samples={num_samples}; it must be a positive count")
    return ClientUpdate(lora_modules_from_tensors(tensors), float(scaling), int(num_samples), client_id)


def update_from_patch(patch, num_samples: int | None = None, client_id: str = "") -> ClientUpdate:
    """A ClientUpdate from a Patch; MoS (or any kind with `materialize`) goes through its materialized LoRA."""
    from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
    from patchlm.adapters.peft_io import to_lora_patch

    lora = to_lora_patch(patch)
    mods = lora_modules_from_tensors(lora.tensors)
    ranks = {a.shape[0] for a, _ in mods.values()}
    if len(ranks) != 1 and lora.spec.get("scaling") is None:
        raise PatchFormatError("a LoRA patch with per-module ranks needs spec['scaling'] to federate")
    scaling = module_scaling(lora.spec, next(iter(ranks)))
    n = num_samples if num_samples is not None else (patch.metrics.get("num_samples") or patch.spec.get("num_samples"))
    return update_from_tensors(lora.tensors, scaling, n, client_id)


def data_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j."""
    total = sum(u.num_samples for u in updates)
    return [u.num_samples / total for u in updates]


def _check(updates: list[ClientUpdate]) -> list[str]:
    if not updates:
        raise ConfigError("no client updates to aggregate")
    names = sorted(updates[0].modules)
    for u in updates[1:]:
        if sorted(u.modules) != names:
            diff = sorted(set(u.modules) ^ set(names))
            raise PatchFormatError(f"client {u.client_id or '?'} adapts other modules than the first client "
                                   f"(differences: {', '.join(diff[:3])}); all clients must use the same targets")
    for n in names:
        shapes = {(u.modules[n][0].shape[1], u.modules[n][1].shape[0]) for u in updates}
        if len(shapes) != 1:
            raise PatchFormatError(f"module {n}: clients disagree on its shape {sorted(shapes)}")
    return names


RULES: dict[str, Callable[[list[ClientUpdate]], GlobalLoRA]] = {}


def rule(name: str):
    """Register an aggregation rule under `name`."""

    def deco(fn):
        RULES[name] = fn
        fn.rule_name = name
        return fn

    return deco


def get_rule(name: str) -> Callable[[list[ClientUpdate]], GlobalLoRA]:
    if name not in RULES:
        raise UnknownNameError(f"unknown aggregation rule {name!r}; {did_you_mean(name, RULES)}")
    return RULES[name]


def aggregate(name: str, updates: list[ClientUpdate]) -> GlobalLoRA:
    """Aggregate client updates with the rule `name`."""
    return get_rule(name)(updates)


@rule("flora")
def flora(updates: list[ClientUpdate]) -> GlobalLoRA:
    """Stack p_k s_k A_k rows and B_k columns: B_g A_g = sum_k p_k s_k B_k A_k exactly, any ranks."""
    names = _check(updates)
    p = data_weights(updates)
    out = {}
    for n in names:
        a = torch.cat([u.modules[n][0].double() * (pk * u.scaling) for u, pk in zip(updates, p, strict=True)], dim=0)
        b = torch.cat([u.modules[n][1].double() for u in updates], dim=1)
        out[n] = (a, b)
    return GlobalLoRA(out, "flora", p)


@rule("fedit")
def fedit(updates: list[ClientUpdate]) -> GlobalLoRA:
    """Average A and B separately (scalings folded into B). Inexact; refuses mixed ranks."""
    names = _check(updates)
    ranks = sorted(set().union(*(u.ranks for u in updates)))
    if len(ranks) != 1:
        raise ConfigError(f"fedit averages A and B separately and cannot combine mixed ranks {ranks}; "
                          "set aggregation to flora (exact), zeropad or ffa", field="aggregation")
    p = data_weights(updates)
    out = {}
    for n in names:
        a = sum(u.modules[n][0].double() * pk for u, pk in zip(updates, p, strict=True))
        b = sum(u.modules[n][1].double() * (pk * u.scaling) for u, pk in zip(updates, p, strict=True))
        out[n] = (a, b)
    return GlobalLoRA(out, "fedit", p)


def _pad(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = a.shape[0]
    if k == r:
        return a.double(), b.double()
    a2 = torch.zeros(r, a.shape[1], dtype=torch.float64)
    b2 = torch.zeros(b.shape[0], r, dtype=torch.float64)
    a2[:k], b2[:, :k] = a.double(), b.double()
    return a2, b2


@rule("zeropad")
def zeropad(updates: list[ClientUpdate]) -> GlobalLoRA:
    """Pad A rows / B columns with zeros to the largest rank, then average A and B separately."""
    names = _check(updates)
    p = data_weights(updates)
    out = {}
    for n in names:
        r = max(u.modules[n][0].shape[0] for u in updates)
        padded = [_pad(*u.modules[n], r) for u in updates]
        a = sum(pa * pk for (pa, _), pk in zip(padded, p, strict=True))
        b = sum(pb * (pk * u.scaling) for (_, pb), u, pk in zip(padded, updates, p, strict=True))
        out[n] = (a, b)
    return GlobalLoRA(out, "zeropad", p)


@rule("ffa")
def ffa(updates: list[ClientUpdate], atol: float = 1e-6) -> GlobalLoRA:
    """FFA-LoRA: A shared and frozen (each A_k = first r_k rows of the largest), B averaged (zero-padded)."""
    names = _check(updates)
    p = data_weights(updates)
    out = {}
    for n in names:
        big = max(updates, key=lambda u: u.modules[n][0].shape[0])
        a_g = big.modules[n][0].double()
        r = a_g.shape[0]
        for u in updates:
            a = u.modules[n][0].double()
            if not torch.allclose(a, a_g[: a.shape[0]], atol=atol, rtol=0):
                raise ConfigError(f"ffa needs one shared frozen A, but client {u.client_id or '?'} has another A "
                                  f"for module {n}; train with A frozen from the round's shared seed")
        b = sum(_pad(*u.modules[n], r)[1] * (pk * u.scaling) for u, pk in zip(updates, p, strict=True))
        out[n] = (a_g.clone(), b)
    return GlobalLoRA(out, "ffa", p)


# ---------------------------------------------------------------- exactness
def ideal_delta(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """sum_k p_k dW_k for one module (float64)."""
    p = data_weights(updates)
    return sum(u.delta(name) * pk for u, pk in zip(updates, p, strict=True))


def aggregation_error(global_lora: GlobalLoRA, updates: list[ClientUpdate]) -> float:
    """||dW_global - sum_k p_k dW_k||_F / ||sum_k p_k dW_k||_F over all modules together (float64)."""
    num, den = 0.0, 0.0
    for n in global_lora.modules:
        ideal = ideal_delta(updates, n)
        num += float(((global_lora.delta(n) - ideal) ** 2).sum())
        den += float((ideal ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


# ---------------------------------------------------------------- applying global updates
@torch.no_grad()
def merge_tensors_into_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], scaling: float = 1.0) -> None:
    """Add scaling * B A of a LoRA tensor dict into the model's Linear weights (the FLoRA merge step)."""
    from patchlm.adapters.lora import lora_modules_from_tensors

    for n, (a, b) in lora_modules_from_tensors(tensors).items():
        mod = model.get_submodule(n)
        w = mod.weight
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise PatchFormatError(f"global update for {n} has shape {b.shape[0]}x{a.shape[1]} but the model's "
                                   f"weight is {tuple(w.shape)}")
        w.add_(((b.double() @ a.double()) * scaling).to(w.dtype))


def stack_rounds(round_tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate several scaling-1 LoRA tensor dicts into one whose B A is their sum (exact)."""
    from patchlm.adapters.lora import lora_modules_from_tensors

    mods: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for t in round_tensors:
        for n, ab in lora_modules_from_tensors(t).items():
            mods.setdefault(n, []).append(ab)
    out = {}
    for n, parts in mods.items():
        out[f"{n}.lora_A"] = torch.cat([a.float() for a, _ in parts], 0).contiguous()
        out[f"{n}.lora_B"] = torch.cat([b.float() for _, b in parts], 1).contiguous()
    return out
