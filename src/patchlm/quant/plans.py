"""Bit plans: which bits and group size each unit gets, from a small rule language or an allocation heuristic.

Rules are `SELECTOR=BITS[/GROUP]` joined by ';' (or newlines), applied in order, later rules overriding earlier
ones; a unit no rule selects keeps 16 bits. Selectors: `all`, `attn`, `mlp` (dense MLP linears), `experts`,
`shared` (shared experts), `experts:L` (every expert of layer L), `expert:L.E` (one expert), `first:K` / `last:K`
(blocks), `layer:L`, `layers:A-B`, `type:NAME` (a linear type such as down_proj), `re:REGEX` (full unit names).
A selector that matches nothing is an error (a plan naming modules that do not exist). Average bits =
sum(bits x params) / sum(params) over every unit (16 for the kept ones).

Heuristics produce a plan at an average-bits budget: every unit starts at low bits, and units are raised to high
bits in priority order while the average stays within the budget. Priorities: attn (attention first), mlp (MLP and
experts first), first-k (earlier blocks first), down-first (down projections first), frequency (MoE: attention,
then experts by how many calibration tokens the router sends them), outlier (the outlier score
max_j(max_i |W_ij| / mean_i |W_ij|)), predictor (blocks whose learned predictor says they change the hidden state
most, 1 - cos(in, out)), random (seeded), and uniform (every unit at the budget).
"""

from __future__ import annotations

import random as _random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from patchlm.errors import ConfigError
from patchlm.quant.config import BITS, KEEP
from patchlm.quant.units import Unit

HEURISTICS = ("attn", "mlp", "first-k", "down-first", "frequency", "outlier", "predictor", "random", "uniform")


@dataclass(frozen=True)
class Choice:
    bits: int
    group_size: int


Plan = dict[str, Choice]  # unit name -> choice (every unit of the model)


def average_bits(plan: Plan, units: list[Unit]) -> float:
    """sum(bits x params) / sum(params)."""
    total = sum(u.params for u in units)
    return sum(plan[u.name].bits * u.params for u in units) / total if total else 0.0


def _select(sel: str, units: list[Unit]) -> list[Unit]:
    nl = 1 + max((u.layer for u in units), default=-1)

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(".")]
        except ValueError:
            raise ConfigError(f"plan selector {sel!r}: expected integers after ':'", field="plan") from None

    if sel == "all":
        return list(units)
    if sel in ("attn", "mlp", "experts", "shared"):
        return [u for u in units if u.group == sel]
    kind, _, arg = sel.partition(":")
    if not arg:
        raise ConfigError(f"unknown plan selector {sel!r}; selectors: all, attn, mlp, experts, shared, experts:L, "
                          "expert:L.E, first:K, last:K, layer:L, layers:A-B, type:NAME, re:REGEX", field="plan")
    if kind == "re":
        try:
            rx = re.compile(arg)
        except re.error as e:
            raise ConfigError(f"plan selector {sel!r}: bad regex ({e})", field="plan") from None
        return [u for u in units if rx.search(u.name)]
    if kind == "type":
        return [u for u in units if u.type == arg]
    if kind == "experts":
        (layer,) = ints(arg)
        return [u for u in units if u.group == "experts" and u.layer == layer]
    if kind == "expert":
        parts = ints(arg)
        if len(parts) != 2:
            raise ConfigError(f"plan selector {sel!r}: write expert:LAYER.EXPERT", field="plan")
        return [u for u in units if u.expert is not None and (u.layer, u.expert) == tuple(parts)]
    if kind in ("first", "last"):
        (k,) = ints(arg)
        keep = range(k) if kind == "first" else range(nl - k, nl)
        return [u for u in units if u.layer in keep]
    if kind == "layer":
        (layer,) = ints(arg)
        return [u for u in units if u.layer == layer]
    if kind == "layers":
        try:
            a, b = (int(x) for x in arg.split("-"))
        except ValueError:
            raise ConfigError(f"plan selector {sel!r}: write layers:A-B", field="plan") from None
        return [u for u in units if a <= u.layer <= b]
    raise ConfigError(f"unknown plan selector {sel!r}", field="plan")


def parse_rules(text: str) -> list[tuple[str, int, int | None]]:
    """[(selector, bits, group or None)] of a plan's text ('@FILE' reads the rules from FILE)."""
    if text.startswith("@"):
        f = Path(text[1:])
        if not f.is_file():
            raise ConfigError(f"plan file {f} does not exist", field="plan")
        text = f.read_text(encoding="utf-8")
    rules = []
    for raw in re.split(r"[;\n]", text):
        rule = raw.split("#", 1)[0].strip()
        if not rule:
            continue
        sel, eq, val = rule.rpartition("=")
        if not eq or not sel.strip():
            raise ConfigError(f"plan rule {rule!r} should read SELECTOR=BITS[/GROUP]", field="plan")
        bits_s, _, group_s = val.partition("/")
        try:
            bits = int(bits_s)
            group = int(group_s) if group_s else None
        except ValueError:
            raise ConfigError(f"plan rule {rule!r}: bits and group size must be integers", field="plan") from None
        if bits not in (*BITS, KEEP):
            raise ConfigError(f"plan rule {rule!r}: {bits} bits is not implemented; choose "
                              f"{', '.join(map(str, (*BITS, KEEP)))} (16 keeps the module)", field="plan")
        if group is not None and group < 0:
            raise ConfigError(f"plan rule {rule!r}: group size must be >= 0", field="plan")
        rules.append((sel.strip(), bits, group))
    if not rules:
        raise ConfigError("the plan has no rules", field="plan")
    return rules


def plan_from_rules(text: str, units: list[Unit], group_size: int) -> Plan:
    """Resolve a rule text against the model's units (unselected units keep 16 bits)."""
    plan = {u.name: Choice(KEEP, group_size) for u in units}
    for sel, bits, group in parse_rules(text):
        hit = _select(sel, units)
        if not hit:
            raise ConfigError(f"plan selector {sel!r} matches no module of this model (it has "
                              f"{len(units)} units in {1 + max(u.layer for u in units)} blocks, types "
                              f"{', '.join(sorted({u.type for u in units}))})", field="plan")
        for u in hit:
            plan[u.name] = Choice(bits, group_size if group is None else group)
    return plan


def uniform_plan(units: list[Unit], bits: int, group_size: int) -> Plan:
    return {u.name: Choice(bits, group_size) for u in units}


def allocate(units: list[Unit], order: list[str], budget: float, low: int, high: int, group_size: int) -> Plan:
    """Every unit at `low`; then raise units to `high` in `order` (skipping one that would break the budget)."""
    if not low <= budget <= high:
        raise ConfigError(f"average-bits budget {budget:g} is outside [{low}, {high}] (low_bits, high_bits)",
                          field="plan")
    plan = {u.name: Choice(low, group_size) for u in units}
    by_name = {u.name: u for u in units}
    total = sum(u.params for u in units)
    spent = low * total
    for n in order:
        extra = (high - low) * by_name[n].params
        if spent + extra <= budget * total + 1e-9:
            plan[n] = Choice(high, group_size)
            spent += extra
    return plan


# ---------------------------------------------------------------- scorers
def outlier_score(w: torch.Tensor) -> float:
    """max over input columns j of max_i |W_ij| / mean_i |W_ij| (W [out, in]): large when a channel has outliers."""
    a = w.detach().float().abs()
    ratio = a.max(dim=0).values / a.mean(dim=0).clamp_min(1e-12)
    return float(ratio.max())


def priority(name: str, units: list[Unit], *, weights: Callable[[Unit], torch.Tensor] | None = None,
             usage: dict[tuple[int, int], float] | None = None, block_scores: dict[int, float] | None = None,
             seed: int = 0) -> list[str]:
    """Unit names in the order heuristic `name` raises them (ties: layer order)."""
    idx = {u.name: i for i, u in enumerate(units)}

    def by(key) -> list[str]:
        return [u.name for u in sorted(units, key=lambda u: (key(u), idx[u.name]))]

    if name == "attn":
        return by(lambda u: 0 if u.group == "attn" else 1)
    if name == "mlp":
        return by(lambda u: 0 if u.group in ("mlp", "experts", "shared") else 1)
    if name == "first-k":
        return by(lambda u: u.layer)
    if name == "down-first":
        return by(lambda u: 0 if u.type == "down_proj" else 1)
    if name == "frequency":
        if not any(u.expert is not None for u in units):
            raise ConfigError("the frequency heuristic needs a Mixture-of-Experts model (this one has no experts)",
                              field="plan")
        usage = usage or {}
        return by(lambda u: -1.0 if u.expert is None else -usage.get((u.layer, u.expert), 0.0))
    if name == "outlier":
        if weights is None:
            raise ValueError("the outlier heuristic needs the weights")
        scores = {u.name: outlier_score(weights(u)) for u in units}
        return by(lambda u: -scores[u.name])
    if name == "predictor":
        if block_scores is None:
            raise ValueError("the predictor heuristic needs block scores")
        return by(lambda u: -block_scores.get(u.layer, 0.0))
    if name == "random":
        order = [u.name for u in units]
        _random.Random(seed).shuffle(order)
        return order
    raise ConfigError(f"unknown heuristic {name!r}; choices: {', '.join(HEURISTICS)}", field="plan")


def parse_heuristic(text: str) -> tuple[str, float] | None:
    """('name', budget) for a plan 'heuristic:NAME@AVG', None for a rule plan."""
    if not text.startswith("heuristic:"):
        return None
    name, at, budget = text[len("heuristic:"):].partition("@")
    if name not in HEURISTICS:
        raise ConfigError(f"unknown heuristic {name!r}; choices: {', '.join(HEURISTICS)}", field="plan")
    try:
        value = float(budget) if at else None
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ConfigError(f"plan {text!r}: write heuristic:{name}@AVG_BITS, e.g. heuristic:{name}@2.5", field="plan")
    return name, value
