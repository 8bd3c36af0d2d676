"""LLM-Drop: choose attention / MLP / whole-block drops from similarity scores, as a `drop` patch.

Methods (pure functions on score lists, except `iterative` which re-scores the model):
  one-shot     drop the n most similar modules of one type (attention, mlp or block);
  iterative    drop the most similar, re-score with that drop applied, repeat n times;
  joint        rank attention and MLP modules together and drop the n most similar of either type;
  consecutive  the baseline: drop the n consecutive blocks whose span changes the residual stream least
               (cos(input of layer l, output of layer l+n-1), the layer-pruning criterion of ShortGPT-style
               depth pruning).
A drop patch's spec holds the dropped indices per module type; its tensors hold the score vectors.
Applying it removes the modules for real (patchlm.depth.runtime). Whole-block plans export to a standard
Hugging Face checkpoint with fewer layers (`export_hf`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from patchlm.depth import runtime
from patchlm.depth.arch import check_indices, decoder_layers, family
from patchlm.depth.config import METHODS, DropConfig
from patchlm.depth.scores import similarity_scores, span_similarity
from patchlm.errors import ConfigError, PatchFormatError, UnknownNameError, did_you_mean
from patchlm.models.export import save_hf_checkpoint
from patchlm.patch import Patch, PatchKind, provenance, register_kind
from patchlm.paths import check_output

TYPES = ("attention", "mlp", "block")


def top_similar(scores: list[float], n: int, exclude=()) -> list[int]:
    """Indices of the n highest scores (ties: the later layer first), skipping `exclude`."""
    order = sorted((i for i in range(len(scores)) if i not in set(exclude)), key=lambda i: (-scores[i], -i))
    return sorted(order[:n])


def one_shot(scores: dict[str, list[float]], attn: int = 0, mlp: int = 0, blocks: int = 0) -> dict[str, list[int]]:
    """Drop the most similar modules of each type independently (a block drop removes both sub-layers)."""
    return {"attention": top_similar(scores["attention"], attn), "mlp": top_similar(scores["mlp"], mlp),
            "block": top_similar(scores["block"], blocks)}


def joint(scores: dict[str, list[float]], modules: int) -> dict[str, list[int]]:
    """Rank attention and MLP modules together; drop the `modules` most similar of either type."""
    cand = [(s, "attention", i) for i, s in enumerate(scores["attention"])]
    cand += [(s, "mlp", i) for i, s in enumerate(scores["mlp"])]
    cand.sort(key=lambda c: (-c[0], c[1] != "attention", -c[2]))
    out = {"attention": [], "mlp": [], "block": []}
    for _, t, i in cand[:modules]:
        out[t].append(i)
    return {k: sorted(v) for k, v in out.items()}


def consecutive(span_scores: list[float], blocks: int) -> dict[str, list[int]]:
    """Drop `blocks` consecutive blocks starting where cos(in_l, out_{l+n-1}) is highest."""
    start = max(range(len(span_scores)), key=lambda i: (span_scores[i], i))
    return {"attention": [], "mlp": [], "block": list(range(start, start + blocks))}


def effective(plan: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """(attention indices, MLP indices) removed by a plan (blocks count for both)."""
    a = sorted(set(plan.get("attention", [])) | set(plan.get("block", [])))
    m = sorted(set(plan.get("mlp", [])) | set(plan.get("block", [])))
    return a, m


def validate_plan(plan: dict, num_layers: int) -> dict[str, list[int]]:
    """Check indices and that something of the model remains; return the normalised plan."""
    unknown = set(plan) - set(TYPES)
    if unknown:
        raise PatchFormatError(f"drop plan has unknown module type(s) {sorted(unknown)}; types: {', '.join(TYPES)}")
    out = {t: check_indices(plan.get(t, []), num_layers, t) for t in TYPES}
    a, m = effective(out)
    if len(a) == num_layers and len(m) == num_layers:
        raise ConfigError(f"the plan drops every layer ({num_layers} of {num_layers}); keep at least one")
    if len(a) == num_layers:
        raise ConfigError(f"the plan drops all {num_layers} attention layers; at least one must remain")
    return out


def make_plan(model, blocks_tensor: torch.Tensor, method: str = DropConfig.method, attn: int = DropConfig.attn,
              mlp: int = DropConfig.mlp, blocks: int = DropConfig.blocks, modules: int = DropConfig.modules,
              batch_size: int = DropConfig.batch_size, bf16: bool = DropConfig.bf16,
              log=None) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Score the model on calibration blocks and choose the drops; returns (plan, scores of the full model).

    The arguments are DropConfig's fields (errors name them)."""
    if method not in METHODS:
        raise UnknownNameError(f"unknown drop method {method!r}; {did_you_mean(method, METHODS)}")
    n = len(decoder_layers(model))
    for name, v in (("attn", attn), ("mlp", mlp), ("blocks", blocks), ("modules", modules)):
        if v < 0 or v > n * (2 if name == "modules" else 1):
            raise ConfigError(f"{name} {v} is out of range for a model with {n} layers", field=name)
    if method == "joint":
        if modules <= 0:
            modules = attn + mlp
        if modules <= 0 or blocks:
            raise ConfigError("the joint method drops attention and MLP modules ranked together: set modules "
                              "(or attn and mlp, summed), not blocks", field="modules")
    elif method == "consecutive":
        if blocks <= 0 or attn or mlp:
            raise ConfigError("the consecutive method drops whole blocks: set blocks only", field="blocks")
    elif attn + mlp + blocks == 0:
        raise ConfigError("nothing to drop: set attn, mlp or blocks", field="attn")
    if method != "joint" and (attn >= n or blocks >= n):
        raise ConfigError(f"cannot drop {max(attn, blocks)} of {n} attention layers: at least one must remain",
                          field="attn" if attn >= n else "blocks")
    family(model, "dropping")
    log = log or (lambda m: None)
    scores = similarity_scores(model, blocks_tensor, batch_size=batch_size, bf16=bf16)
    if method == "one-shot":
        plan = one_shot(scores, attn, mlp, blocks)
    elif method == "joint":
        plan = joint(scores, modules)
    elif method == "consecutive":
        plan = consecutive(span_similarity(model, blocks_tensor, blocks, batch_size=batch_size, bf16=bf16), blocks)
    else:
        plan = iterative(model, blocks_tensor, attn, mlp, blocks, scores, batch_size=batch_size, bf16=bf16, log=log)
    return validate_plan(plan, n), scores


def iterative(model, blocks_tensor, attn: int, mlp: int, blocks: int, first_scores: dict,
              batch_size: int = DropConfig.batch_size, bf16: bool = DropConfig.bf16, log=None) -> dict[str, list[int]]:
    """Drop one module at a time, re-scoring with the drops so far applied (one type after the other)."""
    log = log or (lambda m: None)
    before = runtime.dropped(model)
    plan = {"attention": [], "mlp": [], "block": []}
    try:
        for t, want in (("block", blocks), ("attention", attn), ("mlp", mlp)):
            for _ in range(want):
                a, m = effective(plan)
                if a or m:
                    runtime.apply_drops(model, sorted(set(a) | set(before[0])), sorted(set(m) | set(before[1])))
                    scores = similarity_scores(model, blocks_tensor, batch_size=batch_size, bf16=bf16)
                else:
                    scores = first_scores
                gone = {"block": set(a) & set(m), "attention": set(a), "mlp": set(m)}[t]
                plan[t] += top_similar(scores[t], 1, exclude=gone)
                log(f"iterative: dropped {t} {plan[t][-1]}")
    finally:
        if any(before):
            runtime.apply_drops(model, *before)
        else:
            runtime.restore_drops(model)
    return {k: sorted(v) for k, v in plan.items()}


# ---------------------------------------------------------------- the patch kind
@register_kind("drop", stage="depth")
class DropKind(PatchKind):
    """spec: attention, mlp, block (dropped layer indices), method, num_layers, calib. tensors: scores.<type>."""

    def attach(self, model, spec, tensors=None, seed=0):
        n = len(decoder_layers(model))
        if int(spec.get("num_layers", n)) != n:
            raise PatchFormatError(f"drop plan was made for a model with {spec['num_layers']} layers, this one has {n}")
        plan = validate_plan({t: spec.get(t, []) for t in TYPES}, n)
        a, m = effective(plan)
        runtime.apply_drops(model, a, m)
        return {**spec, **plan, "num_layers": n}

    def detach(self, model):
        runtime.restore_drops(model)

    def state(self, model):
        return {}

    def count_trainable(self, spec, tensors):
        return 0

    def summary(self, spec, tensors):
        a, m = effective(spec)
        return {"dropped_attention": len(a), "dropped_mlp": len(m), "dropped_blocks": len(spec.get("block", [])),
                "num_layers": spec.get("num_layers"), "method": spec.get("method")}


def drop_patch(base, plan: dict[str, list[int]], scores: dict[str, list[float]], method: str, calib: dict,
               on_patches: list[str] | None = None) -> Patch:
    """A drop patch for `base` from a plan and the scores it came from."""
    n = len(decoder_layers(base.model))
    plan = validate_plan(plan, n)
    spec = {**plan, "method": method, "num_layers": n, "calib": calib, "scored_with_patches": on_patches or []}
    tensors = {f"scores.{t}": torch.tensor(scores[t], dtype=torch.float32) for t in TYPES if t in scores}
    return Patch(kind="drop", base=base.ref(), spec=spec, tensors=tensors,
                 provenance=provenance(method=method, calib=calib.get("task")),
                 metrics={"dropped_attention": len(effective(plan)[0]), "dropped_mlp": len(effective(plan)[1])})


# ---------------------------------------------------------------- export
def export_hf(model, tokenizer, blocks: list[int], out: str | Path, force: bool = False) -> Path:
    """Write a standard HF checkpoint without the dropped blocks (layers renumbered, config consistent).

    The model must carry no runtime drops or routers (LoRA wrappers are baked in first by the caller). The layer
    removal is done here; the writing is patchlm.models.export.save_hf_checkpoint (atomic, plain checkpoints only).
    """
    import copy

    out = check_output(out, force)
    family(model, "dropping")
    n = len(decoder_layers(model))
    blocks = check_indices(blocks, n, "block")
    if not blocks:
        raise ConfigError("nothing to export: the plan drops no whole block (only block drops export)")
    if len(blocks) >= n:
        raise ConfigError(f"cannot drop every layer ({n} of {n})")
    if any(getattr(layer, "_depth", None) is not None for layer in decoder_layers(model)):
        raise ConfigError("export the base model without runtime drops or routers applied")
    sd = model.state_dict()
    if any(".lora_" in k or k.endswith(".base.weight") for k in sd):
        raise ConfigError("the model carries LoRA wrappers: bake them in (bake_lora) before exporting")
    keep = [i for i in range(n) if i not in blocks]
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = "model.layers."
    new_sd = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            if int(i) not in new_index:
                continue
            k = f"{prefix}{new_index[int(i)]}.{rest}"
        new_sd[k] = v
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, len(keep))
    new_model = type(model)(cfg)
    missing, unexpected = new_model.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if k not in getattr(new_model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise PatchFormatError(f"export failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(cfg, "tie_word_embeddings", False):
        new_model.tie_weights()
    new_model.eval()
    return save_hf_checkpoint(new_model, tokenizer, out, force=force)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key/value tensors (uninitialised layers hold none)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
