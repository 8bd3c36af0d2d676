"""Write a model as a plain transformers checkpoint (safetensors + config + tokenizer), atomically.

The one writer behind `patchlm export --format merged` (a patch baked into its base) and `patchlm drop apply
--export-hf` (a base with whole blocks removed). The caller bakes or removes its patch first; this module only
checks that what is left is a plain model of its class, and writes it through a temporary directory and a rename.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from patchlm.errors import ConfigError
from patchlm.paths import atomic_dir, check_output


def foreign_keys(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(state-dict keys a fresh model of this class does not have, keys it has that `model` lacks).

    Both empty for a plain model. Extra keys come from modules a patch added (LoRA wrappers, routers), missing
    ones from modules a patch took out (runtime drops). The fresh model is built on the meta device (no memory);
    a class that cannot be built that way is not checked.
    """
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:
        return [], []
    have, want = set(model.state_dict()), set(fresh.state_dict())
    return sorted(have - want), sorted(want - have)


def save_hf_checkpoint(model: torch.nn.Module, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Write `model` (and `tokenizer`, when given) to `out` as a standard Hugging Face checkpoint.

    Refuses a model that still carries patch modules (bake LoRA in, remove routers and runtime drops first) and
    an existing `out` unless force; on any error `out` is left as it was.
    """
    out = check_output(out, force)
    extra, missing = foreign_keys(model)
    if extra or missing:
        what = f"extra weights {extra[:3]}" if extra else f"missing weights {missing[:3]}"
        raise ConfigError(f"the model is not a plain {type(model).__name__} ({what}): bake LoRA-type patches in and "
                          "remove drop and router patches before writing a checkpoint")
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
