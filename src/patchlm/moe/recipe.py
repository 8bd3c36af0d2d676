"""mergekit-moe YAML configs, read unchanged: base_model, gate_mode, dtype, experts_per_token and experts
(source_model, positive_prompts, negative_prompts, noise_scale, residual_scale); architecture must be mixtral
(or absent). A source_model may also be a patch directory. shared_experts (Qwen/DeepSeek MoE outputs) is refused.
"""

from __future__ import annotations

from pathlib import Path

from patchlm.errors import ConfigError
from patchlm.moe.upcycle import Expert

TOP = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def _prompts(v, where: str) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where} must be a list of strings")
    return list(v)


def _number(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where} must be a number, got {v!r}")
    return float(v)


def load_moe_recipe(path: str | Path) -> tuple[str, list[Expert], dict]:
    """(base model, experts, MoeConfig fields) of a mergekit-moe YAML; clear errors on anything else."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no mergekit-moe config at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with base_model and experts")
    unknown = sorted(set(raw) - TOP)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (mergekit-moe keys: {', '.join(sorted(TOP))})")
    if raw.get("shared_experts"):
        raise ConfigError(f"{path}: shared_experts need a Qwen or DeepSeek MoE output; Mixtral has none")
    arch = raw.get("architecture")
    if arch is not None and not str(arch).lower().startswith("mixtral"):
        raise ConfigError(f"{path}: architecture {arch!r}: patchlm writes Mixtral only")
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base_model must name a model")
    items = raw.get("experts")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: experts must be a non-empty list")
    experts = []
    for i, e in enumerate(items):
        where = f"{path}: experts[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("source_model"), str):
            raise ConfigError(f"{where} needs a source_model (a model path or name)")
        bad = sorted(set(e) - EXPERT)
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r} (expert keys: {', '.join(sorted(EXPERT))})")
        experts.append(Expert(source=e["source_model"],
                              positive_prompts=_prompts(e.get("positive_prompts"), f"{where}.positive_prompts"),
                              negative_prompts=_prompts(e.get("negative_prompts"), f"{where}.negative_prompts"),
                              noise_scale=_number(e.get("noise_scale"), f"{where}.noise_scale"),
                              residual_scale=_number(e.get("residual_scale"), f"{where}.residual_scale")))
    fields: dict = {}
    if "gate_mode" in raw:  # absent: MoeConfig's default, hidden, which is mergekit-moe's default too
        fields["gate_mode"] = raw["gate_mode"]
    if raw.get("experts_per_token") is not None:
        fields["top_k"] = raw["experts_per_token"]
    if raw.get("dtype") is not None:
        fields["dtype"] = DTYPE_ALIASES.get(str(raw["dtype"]), str(raw["dtype"]))
    return base, experts, fields
