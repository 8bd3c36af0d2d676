"""Adapter configs and patch specs: a patch's `spec` maps one-to-one onto its method's config dataclass.

Each adapter method has a config dataclass (`LoraConfig`, `MosConfig`, `VeraConfig`, `VBLoraConfig`) whose
fields carry the defaults and help text; the CLI options and YAML recipes are generated from the same fields.
A spec may also hold the reserved keys below (the init seed, set by the trainer). A fresh spec with any other
key is refused, naming it; a saved patch's spec may carry extra facts (e.g. how it was merged) and loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from patchlm.errors import ConfigError, did_you_mean

RESERVED = ("seed",)  # spec keys every kind may carry besides its config's fields
C = TypeVar("C")


def spec_keys(cls: type) -> list[str]:
    """The keys a spec of config class `cls` may hold."""
    return [f.name for f in dataclasses.fields(cls)] + [k for k in RESERVED if k not in _names(cls)]


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_spec_keys(cls: type, spec: dict, method: str) -> None:
    """Refuse a spec key that is not a field of `cls` (nor reserved), naming it."""
    allowed = spec_keys(cls)
    for k in spec:
        if k not in allowed:
            raise ConfigError(f"unknown {method} spec key {k!r}; {did_you_mean(str(k), allowed)}", field=str(k))


def from_spec(cls: type[C], spec: dict, method: str, strict: bool = True) -> C:
    """The config of a spec: its fields from the spec, the rest defaults (strict: unknown keys are refused)."""
    if strict:
        check_spec_keys(cls, spec, method)
    names = _names(cls)
    return cls(**{k: v for k, v in spec.items() if k in names})


def to_spec(cfg: Any, **resolved: Any) -> dict:
    """A config as a spec dict (JSON-ready), with resolved values (e.g. the module list) laid over it."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    out.update(resolved)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def check_dropout(dropout: Any, method: str) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"{method} dropout must be in [0, 1), got {dropout!r}", field="dropout")


def check_positive_int(value: Any, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"{what} {name} must be an integer, got {value!r}", field=name)
    if value <= 0:
        raise ConfigError(f"{what} {name} must be positive, got {name}={value!r}; set {name} to 1 or more", field=name)
