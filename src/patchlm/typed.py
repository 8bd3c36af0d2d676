"""Strict checks of a config dataclass's field values against their declared types, shared by every config.

YAML recipes, JSON run files and Python callers can hand a config any value; `check_fields(cfg)` refuses what the
type does not say: a float where an int is declared (`steps: 3.7`), a string for a bool (`bf16: "yes please"`),
NaN or infinity for a float, a bool for a number. Integral floats from YAML (`steps: 10.0`) become ints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from patchlm.errors import ConfigError


def _allowed(tp) -> tuple[set[type], bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out, none = set(), False
        for a in typing.get_args(tp):
            if a is type(None):
                none = True
            else:
                sub, _ = _allowed(a)
                out |= sub
        return out, none
    if origin is not None:
        return {origin}, False
    return ({tp} if isinstance(tp, type) else set()), False


def check_fields(cfg) -> None:
    """Coerce integral floats to declared ints; refuse any other value of the wrong type or a non-finite float."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp = hints.get(f.name)
        if tp is None:
            continue
        allowed, none_ok = _allowed(tp)
        v = getattr(cfg, f.name)
        name = f.name
        if v is None:
            if none_ok or not allowed:
                continue
            raise ConfigError(f"{name} needs a value, got none", field=name)
        if not allowed or any(t not in (int, float, bool, str) for t in allowed):
            continue  # lists and other types: the config's own checks
        if isinstance(v, bool):
            if bool not in allowed:
                raise ConfigError(f"{name} must be {_names(allowed)}, got the boolean {v}", field=name)
            continue
        if bool in allowed and not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}", field=name)
        if isinstance(v, float) and int in allowed and float not in allowed:
            if not math.isfinite(v) or v != int(v):
                raise ConfigError(f"{name} must be an integer, got {v!r}", field=name)
            object.__setattr__(cfg, name, int(v))
            continue
        if isinstance(v, int) and float in allowed and int not in allowed:
            object.__setattr__(cfg, name, float(v))
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}", field=name)
            continue
        if not isinstance(v, tuple(allowed)):
            raise ConfigError(f"{name} must be {_names(allowed)}, got {v!r}", field=name)


def _names(allowed: set[type]) -> str:
    return " or ".join(sorted({"int": "an integer", "float": "a number", "str": "text", "bool": "true or false"}
                              .get(t.__name__, t.__name__) for t in allowed))


def parse_index_list(text: str, field: str) -> list[int]:
    """'3,5,10-12' -> [3, 5, 10, 11, 12], sorted and unique; `field` names the option in the error."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"cannot read the {field} list {text!r}: use indices and ranges like 3,5,10-12",
                              field=field) from None
    return sorted(set(out))
