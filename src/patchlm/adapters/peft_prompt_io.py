"""PEFT directories for prefix and prompt patches: PEFT's PREFIX_TUNING / PROMPT_TUNING adapters, both ways.

PEFT saves a prompt-learning adapter as adapter_config.json (written here by PEFT's own config classes) and
adapter_model.safetensors holding one tensor, `prompt_embeddings`: for prefix tuning the flattened key/value
prefix [n, num_layers * 2 * token_dim] (what `PrefixEncoder` returns, so an adapter trained with
prefix_projection=True imports as its effective prefix), for prompt tuning the virtual embeddings [n, hidden].
Both are the patch's own tensor, unchanged: patchlm keeps PEFT's layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from patchlm.adapters.config import from_spec, to_spec
from patchlm.adapters.prefix import TENSOR as PREFIX_TENSOR
from patchlm.adapters.prefix import PrefixConfig
from patchlm.adapters.prompt import TENSOR as PROMPT_TENSOR
from patchlm.adapters.prompt import PromptConfig
from patchlm.errors import PatchFormatError
from patchlm.patch import Patch, provenance
from patchlm.paths import atomic_dir

PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}  # patch kind -> PEFT's peft_type
KINDS = tuple(PEFT_TYPES)
WEIGHTS, CONFIG, SIDECAR, KEY = "adapter_model.safetensors", "adapter_config.json", "patchlm.json", "prompt_embeddings"


def peft_config(patch: Patch):
    """PEFT's config object for a prefix or prompt patch (inference mode, one transformer submodule: causal LM)."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    common = {"task_type": "CAUSAL_LM", "inference_mode": True, "num_transformer_submodules": 1,
              "base_model_name_or_path": patch.base.get("name")}
    if patch.kind == "prefix":
        cfg = from_spec(PrefixConfig, patch.spec, "prefix", strict=False)
        if None in (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim):
            raise PatchFormatError("prefix patch spec lacks num_layers / num_attention_heads / token_dim")
        return PrefixTuningConfig(num_virtual_tokens=int(cfg.num_virtual_tokens), num_layers=int(cfg.num_layers),
                                  num_attention_heads=int(cfg.num_attention_heads), token_dim=int(cfg.token_dim),
                                  encoder_hidden_size=int(cfg.token_dim), prefix_projection=False,
                                  init_weights="zero" if cfg.init == "zero" else None, **common)
    cfg = from_spec(PromptConfig, patch.spec, "prompt", strict=False)
    if cfg.token_dim is None:
        raise PatchFormatError("prompt patch spec lacks token_dim")
    return PromptTuningConfig(num_virtual_tokens=int(cfg.num_virtual_tokens), token_dim=int(cfg.token_dim),
                              prompt_tuning_init="SAMPLE_VOCAB" if cfg.init == "vocab" else "RANDOM", **common)


def _tensor(patch: Patch) -> torch.Tensor:
    name = PREFIX_TENSOR if patch.kind == "prefix" else PROMPT_TENSOR
    t = patch.tensors.get(name)
    if t is None:
        raise PatchFormatError(f"{patch.kind} patch has no tensor {name!r}")
    return t


def export_prompt_peft(patch: Patch, out: str | Path, force: bool = False) -> Path:
    """Write a prefix or prompt patch as a PEFT adapter directory that peft.PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    if patch.kind not in PEFT_TYPES:
        raise PatchFormatError(f"a {patch.kind} patch is not a prefix or prompt patch")
    cfg = peft_config(patch)
    t = _tensor(patch).detach().float().cpu().contiguous()
    if t.shape[0] != cfg.num_virtual_tokens:
        raise PatchFormatError(f"{patch.kind} tensor has {t.shape[0]} rows but the spec says "
                               f"{cfg.num_virtual_tokens} virtual tokens")
    with atomic_dir(out, force=force) as tmp:
        save_file({KEY: t}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg.save_pretrained(str(tmp))
        # PEFT ignores this sidecar; import reads the base fingerprint and the spec back from it.
        (tmp / SIDECAR).write_text(json.dumps({"base": patch.base, "kind": patch.kind, "spec": patch.spec},
                                              indent=2) + "\n")
    return Path(out)


def import_prompt_peft(path: str | Path, cfg: dict | None = None, base=None) -> Patch:
    """Read a PEFT PREFIX_TUNING or PROMPT_TUNING adapter directory into a prefix or prompt Patch."""
    from safetensors.torch import load_file

    path = Path(path)
    if cfg is None:
        if not (path / CONFIG).exists():
            raise PatchFormatError(f"{path} is not a PEFT adapter directory: no {CONFIG}")
        cfg = json.loads((path / CONFIG).read_text())
    peft_type = cfg.get("peft_type")
    kind = next((k for k, v in PEFT_TYPES.items() if v == peft_type), None)
    if kind is None:
        raise PatchFormatError(f"{path}: peft_type {peft_type!r} is not prefix or prompt tuning")
    if cfg.get("task_type") not in (None, "CAUSAL_LM") or cfg.get("num_transformer_submodules") not in (None, 1):
        raise PatchFormatError(f"{path}: only causal-LM prompt-learning adapters can be imported "
                               f"(task_type {cfg.get('task_type')}, "
                               f"num_transformer_submodules {cfg.get('num_transformer_submodules')})")
    if not (path / WEIGHTS).exists():
        raise PatchFormatError(f"{path} has no {WEIGHTS}")
    raw = load_file(str(path / WEIGHTS))
    if KEY not in raw:
        raise PatchFormatError(f"{path / WEIGHTS} has no {KEY!r} tensor")
    t = raw[KEY].float().contiguous()
    n = int(cfg.get("num_virtual_tokens") or t.shape[0])
    if t.dim() != 2 or t.shape[0] != n:
        raise PatchFormatError(f"{KEY} has shape {tuple(t.shape)}, not ({n}, ...) for {n} virtual tokens")
    if kind == "prefix":
        layers, heads, dim = (cfg.get(k) for k in ("num_layers", "num_attention_heads", "token_dim"))
        if None in (layers, heads, dim) or t.shape[1] != int(layers) * 2 * int(dim):
            raise PatchFormatError(f"{KEY} has shape {tuple(t.shape)}, not ({n}, num_layers x 2 x token_dim) "
                                   f"for num_layers={layers}, token_dim={dim}")
        init = "zero" if cfg.get("init_weights") == "zero" else "random"
        spec = to_spec(PrefixConfig(num_virtual_tokens=n, init=init, num_layers=int(layers),
                                    num_attention_heads=int(heads), token_dim=int(dim)))
        tensors = {PREFIX_TENSOR: t}
    else:
        dim = cfg.get("token_dim")
        if dim is not None and t.shape[1] != int(dim):
            raise PatchFormatError(f"{KEY} has width {t.shape[1]} but adapter_config.json says token_dim={dim}")
        init = "random" if str(cfg.get("prompt_tuning_init", "RANDOM")).upper() == "RANDOM" else "vocab"
        spec = to_spec(PromptConfig(num_virtual_tokens=n, init=init, token_dim=int(t.shape[1])))
        tensors = {PROMPT_TENSOR: t}
    side = path / SIDECAR
    meta = json.loads(side.read_text()) if side.exists() else {}
    if meta.get("kind") == kind and "seed" in (meta.get("spec") or {}):
        spec["seed"] = meta["spec"]["seed"]
    base_ref = base.ref() if base is not None else meta.get("base") or {"name": cfg.get("base_model_name_or_path")}
    return Patch(kind=kind, base=base_ref, spec=spec, tensors=tensors,
                 provenance=provenance(imported_from=str(path), format="peft", peft_type=peft_type,
                                       peft_init=cfg.get("prompt_tuning_init") or cfg.get("init_weights")))
