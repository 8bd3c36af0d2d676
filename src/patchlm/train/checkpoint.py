"""Nested state (an optimizer's state_dict, RNG states, counters) stored as safetensors + JSON, never pickle.

`save_state(dir, name, tree)` writes NAME.safetensors (every tensor, keyed by its path in the tree) and
NAME.json (the tree with each tensor replaced by {"__tensor__": key}); `load_state` rebuilds the tree. Dict
keys that are ints (torch optimizers index their state by int) survive the round trip; tuples come back as
lists, which torch optimizers accept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from patchlm.errors import PatchFormatError
from patchlm.paths import atomic_write_text

_T, _INTKEYS = "__tensor__", "__int_keys__"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_T: key}
    if isinstance(obj, dict):
        out = {str(k): _flatten(v, f"{path}.{k}" if path else str(k), tensors) for k, v in obj.items()}
        ints = [str(k) for k in obj if isinstance(k, int)]
        if ints:
            out[_INTKEYS] = ints
        return out
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}.{i}" if path else str(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors and JSON values only)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _T in obj:
            return tensors[obj[_T]]
        if "__float__" in obj:
            return float(obj["__float__"])
        ints = set(obj.get(_INTKEYS, ()))
        return {(int(k) if k in ints else k): _unflatten(v, tensors) for k, v in obj.items() if k != _INTKEYS}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(directory: str | Path, name: str, tree: Any) -> None:
    """Write NAME.safetensors and NAME.json in `directory` (the JSON last, through a rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(tree, "", tensors)
    tmp = directory / f".{name}.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / f"{name}.safetensors")
    atomic_write_text(directory / f"{name}.json", json.dumps(meta, allow_nan=False))


def load_state(directory: str | Path, name: str) -> Any:
    """Read back what save_state wrote; a missing or damaged file is a PatchFormatError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    jf, tf = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not jf.exists() or not tf.exists():
        raise PatchFormatError(f"checkpoint {directory} has no {name}.json / {name}.safetensors (made by an older "
                               "patchlm, or incomplete): start over with --force")
    try:
        meta = json.loads(jf.read_text())
        tensors = load_file(str(tf))
        return _unflatten(meta, tensors)
    except (json.JSONDecodeError, SafetensorError, OSError, KeyError, ValueError) as e:
        raise PatchFormatError(f"checkpoint {directory}: {name} is damaged ({e}); start over with --force") from e
