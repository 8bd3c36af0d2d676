"""Export a LoRA patch to the PEFT LoRA directory format, and import one back.

PEFT stores `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` and applies
scaling = lora_alpha / r (per module through rank_pattern / alpha_pattern when ranks differ).
Prefix and prompt patches go to and come from PEFT's PREFIX_TUNING / PROMPT_TUNING adapters (`peft_prompt_io`).
"""

from __future__ import annotations

import json
from pathlib import Path

from patchlm.adapters import peft_prompt_io
from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
from patchlm.errors import PatchFormatError
from patchlm.patch import Patch, get_kind, kind_can, provenance
from patchlm.paths import atomic_dir

PREFIX = "base_model.model."


def to_lora_patch(patch: Patch) -> Patch:
    """The patch itself if it is LoRA, else its materialized LoRA (kinds that can be materialized)."""
    if patch.kind == "lora":
        return patch
    if not kind_can(patch.kind, "materialize"):
        raise PatchFormatError(f"a {patch.kind} patch cannot be exported as LoRA (it has no low-rank form)")
    return get_kind(patch.kind).materialize(patch)


def export_peft(patch: Patch, out: str | Path, force: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    if patch.kind in peft_prompt_io.KINDS:  # prefix / prompt tuning: PEFT's prompt-learning adapters
        return peft_prompt_io.export_prompt_peft(patch, out, force=force)

    patch = to_lora_patch(patch)
    mods = lora_modules_from_tensors(patch.tensors)
    if not mods:
        raise PatchFormatError("LoRA patch has no modules to export")
    ranks = {n: a.shape[0] for n, (a, _) in mods.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is the default
    # PEFT scales by lora_alpha / r: pick alpha per module so the product is our scaling exactly.
    alphas = {n: module_scaling(patch.spec, ranks[n]) * ranks[n] for n in mods}
    alpha = alphas[next(n for n in mods if ranks[n] == r)]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": float(patch.spec.get("dropout", 0.0)), "target_modules": sorted(mods),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "base_model_name_or_path": patch.base.get("name"),
    }
    tensors = {}
    for n, (a, b) in mods.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = b.contiguous()
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        # PEFT ignores this sidecar; import_peft reads the base fingerprint back from it.
        (tmp / "patchlm.json").write_text(json.dumps({"base": patch.base, "kind": patch.kind}, indent=2) + "\n")
    return Path(out)


def import_peft(path: str | Path, base=None) -> Patch:
    """Read a PEFT LoRA directory into a LoRA Patch (base info from `base` when given)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_f = path / "adapter_config.json"
    if not cfg_f.exists():
        raise PatchFormatError(f"{path} is not a PEFT adapter directory: no adapter_config.json")
    cfg = json.loads(cfg_f.read_text())
    if cfg.get("peft_type") in peft_prompt_io.PEFT_TYPES.values():
        return peft_prompt_io.import_prompt_peft(path, cfg, base)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PatchFormatError(f"only PEFT LoRA, prefix-tuning and prompt-tuning adapters can be imported, this one "
                               f"is {cfg.get('peft_type')}")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("fan_in_fan_out"):
        raise PatchFormatError("PEFT adapters with use_dora, use_rslora or fan_in_fan_out are not supported")
    wf = path / "adapter_model.safetensors"
    if wf.exists():
        raw = load_file(str(wf))
    elif (path / "adapter_model.bin").exists():  # a pickle: never loaded, whatever unpickler restrictions exist
        raise PatchFormatError(f"{path} holds adapter_model.bin (a pickle), which patchlm never loads; re-save the "
                               "adapter with safe_serialization=True (adapter_model.safetensors)")
    else:
        raise PatchFormatError(f"{path} has no adapter_model.safetensors")
    tensors = {}
    for k, v in raw.items():
        name = k.removeprefix(PREFIX)
        for half in ("lora_A", "lora_B"):
            for suffix in (f".{half}.weight", f".{half}.default.weight"):
                if name.endswith(suffix):
                    tensors[f"{name[: -len(suffix)]}.{half}"] = v.float()
    if not tensors:
        raise PatchFormatError(f"{wf} holds no LoRA tensors")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    mods = lora_modules_from_tensors(tensors)
    spec = {"r": r, "alpha": alpha, "dropout": float(cfg.get("lora_dropout", 0.0)), "targets": sorted(mods)}
    scalings = {}
    for n, (a, _) in mods.items():
        rr = a.shape[0]
        al = _pattern(alpha_pattern, n, alpha)
        if _pattern(rank_pattern, n, r) != rr:
            raise PatchFormatError(f"{n}: tensor rank {rr} disagrees with adapter_config.json")
        scalings[n] = al / rr
    if len(set(scalings.values())) == 1:
        if next(iter(scalings.values())) != alpha / r:
            spec["scaling"] = next(iter(scalings.values()))
    else:
        # fold per-module scaling differences into B so one scaling holds
        s0 = alpha / r
        for n, s in scalings.items():
            tensors[f"{n}.lora_B"] = tensors[f"{n}.lora_B"] * (s / s0)
    side = path / "patchlm.json"
    base_ref = base.ref() if base is not None else (json.loads(side.read_text())["base"] if side.exists()
                                                     else {"name": cfg.get("base_model_name_or_path")})
    return Patch(kind="lora", base=base_ref, spec=spec, tensors=tensors,
                 provenance=provenance(imported_from=str(path), format="peft"))


def _pattern(pattern: dict, name: str, default):
    for key, val in pattern.items():
        if name == key or name.endswith("." + key):
            return val
    return default
