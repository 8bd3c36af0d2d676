"""Upcycling: a Mixtral-style MoE from a base and N specialists (Branch-Train-MiX / mergekit-moe style).

Each specialist (a patch of any weight kind, materialized on the base, or a dense checkpoint of the base's
architecture) gives one expert per layer: its MLP (gate, up, down). Attention, norms and embeddings come from the
base or are averaged over the specialists. Routers start from one of mergekit-moe's gate modes (router.py) and may
then train alone on the specialists' mixed data (train.py). The result is a plain `MixtralForCausalLM` with the
fused expert tensors of transformers 5:

    model.layers.N.mlp.experts.gate_up_proj  [E, 2f, h]  (gate rows first, then up)
    model.layers.N.mlp.experts.down_proj     [E, h, f]
    model.layers.N.mlp.gate.weight           [E, h]

With N identical experts the MoE equals the dense model for any router: Mixtral renormalises the top-k weights to
sum to one. Config fields mergekit-moe drops (rope settings, head_dim, sliding_window) are carried over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError
from patchlm.models.parts import is_fused_experts
from patchlm.moe.config import PROMPTED, MoeConfig
from patchlm.moe.router import gate_vectors
from patchlm.patch import Patch, get_kind, kind_can

MLP = ("gate_proj", "up_proj", "down_proj")
# Mixtral's layer is Llama's / Mistral's with the MLP replaced: these config fields must agree among the inputs
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "hidden_act")
# what Mixtral cannot express, by family (model_type): named in the error
UNSUPPORTED = {
    "gemma": "GeGLU MLP with gelu, (1 + w) RMSNorm and scaled embeddings",
    "gemma2": "gelu MLP, extra pre/post-feedforward norms, attention and final-logit softcapping",
    "gemma3": "gelu MLP, q/k norms, extra pre/post-feedforward norms, final-logit softcapping",
    "gemma3_text": "gelu MLP, q/k norms, extra pre/post-feedforward norms, final-logit softcapping",
    "qwen2": "bias on q/k/v projections",
    "qwen3": "q/k norms",
    "phi3": "fused qkv and gate_up projections",
    "gpt2": "learned positions, LayerNorm and a GELU MLP",
}


@dataclass
class Expert:
    """One specialist: where it comes from, and what routes to it (prompts, or the task they come from)."""

    source: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None      # mergekit-moe's per-expert noise (None: MoeConfig.expert_noise)
    residual_scale: float | None = None   # mergekit-moe's: down_proj multiplied by it
    task: str | None = None               # prompts and router-training data (default: a patch's training task)
    patch: Patch | None = None            # an in-memory patch (source is then only its name)

    @property
    def is_patch(self) -> bool:
        return self.patch is not None or (Path(self.source) / "patch.json").exists()

    def load_patch(self) -> Patch | None:
        if self.patch is not None:
            return self.patch
        return Patch.load(self.source) if self.is_patch else None


@dataclass
class Upcycled:
    """The MoE in memory, its tokenizer, and what went into it."""

    model: torch.nn.Module
    tokenizer: object
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- checks
def check_family(config: dict, what: str) -> None:
    """Refuse a model whose layers Mixtral cannot express, naming the family and what it lacks."""
    mt = config.get("model_type", "?")
    if mt in UNSUPPORTED:
        raise ConfigError(f"{what} is a {mt} model: a Mixtral MoE cannot express its {UNSUPPORTED[mt]} "
                          "(upcycling takes Llama and Mistral models)")
    if mt not in ("llama", "mistral"):
        raise ConfigError(f"{what} is a {mt} model: upcycling into Mixtral takes Llama and Mistral models only")
    if config.get("attention_bias") or config.get("mlp_bias"):
        which = "attention" if config.get("attention_bias") else "MLP"
        raise ConfigError(f"{what} is a {mt} model with {which} biases, which a Mixtral MoE cannot express")


def _shape(config: dict) -> dict:
    out = {k: config.get(k) for k in SHAPE_FIELDS}
    if out["head_dim"] is None and config.get("hidden_size") and config.get("num_attention_heads"):
        out["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    out["model_type"] = {"mistral": "llama"}.get(out["model_type"], out["model_type"])  # same layer layout
    return out


def checkpoint_fingerprint(ref: str) -> str:
    """The fingerprint of a checkpoint directory, streamed (no model loaded); 'unknown' when it cannot be had."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from patchlm.models.base import cached_fingerprint
        from patchlm.models.checkpoint import Checkpoint
        from patchlm.models.fingerprint import fingerprint_checkpoint

        ck = Checkpoint(ref)
        fp = cached_fingerprint(ck.path)
        if fp:
            return fp
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ck.path))
        return fingerprint_checkpoint(ck, meta) or "unknown"
    except Exception:
        return "unknown"


# ---------------------------------------------------------------- specialists' weights
def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def _effective_weight(module: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The weight a (possibly patched) linear module applies: module(I) - module(0), transposed.

    Works for any weight kind that keeps each module linear (LoRA, MoS, VeRA, VB-LoRA, merged deltas): the patch
    is materialized on the base without knowing its kind's internals."""
    was = module.training
    module.eval()
    p = next(module.parameters())
    eye = torch.eye(in_features, dtype=p.dtype, device=p.device)
    w = (module(eye) - module(torch.zeros(1, in_features, dtype=p.dtype, device=p.device))).T
    module.train(was)
    return w.float().cpu().contiguous()


def patch_weights(patch: Patch, base, linears: Sequence[str]) -> dict[str, torch.Tensor]:
    """name -> weight of every Linear of the base with `patch` applied (the base is restored afterwards)."""
    if get_kind(patch.kind).stage != "weight" or not kind_can(patch.kind, "export-merged"):
        raise ConfigError(f"a {patch.kind} patch ({patch.path}) cannot be an expert: its kind has no merged form "
                          "(only weight patches that bake into the base, e.g. lora, mos, merged, full)")
    if patch.base.get("architecture") and patch.base["architecture"] != base.architecture:
        raise BaseMismatchError(
            f"specialist {patch.path} was made for a {patch.base['architecture']} ({patch.base.get('name')}, "
            f"fingerprint {patch.base.get('fingerprint')}), not for {base.name} ({base.architecture}, "
            f"fingerprint {base.fingerprint})")
    if patch.base.get("fingerprint") and patch.base["fingerprint"] != base.fingerprint:
        raise BaseMismatchError(
            f"specialist {patch.path} was made for base {patch.base.get('name')} (fingerprint "
            f"{patch.base['fingerprint']}), but the base {base.name} has fingerprint {base.fingerprint}")
    ins = {n: base.model.get_submodule(n).in_features for n in linears}
    patch.apply(base)
    try:
        return {n: _effective_weight(base.model.get_submodule(n), ins[n]) for n in linears}
    finally:
        get_kind(patch.kind).detach(base.model)


def checkpoint_weights(ref: str, base, base_config: dict, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a dense checkpoint, after checking it has the base's architecture and shapes."""
    from patchlm.models.checkpoint import Checkpoint

    ck = Checkpoint(ref)
    check_family(ck.config, f"specialist {ref}")
    mine, theirs = _shape(base_config), _shape(ck.config)
    diff = [k for k in SHAPE_FIELDS if mine[k] != theirs[k]]
    if diff:
        k = diff[0]
        raise BaseMismatchError(
            f"specialist {ref} ({ck.architecture}, {k}={theirs[k]}, fingerprint {checkpoint_fingerprint(ref)}) "
            f"does not have the architecture of the base {base.name} ({base.architecture}, {k}={mine[k]}, "
            f"fingerprint {base.fingerprint})")
    out = {}
    for n in names:
        if n not in ck.meta:
            raise PatchFormatError(f"specialist {ref} has no tensor {n}")
        out[n] = ck.read(n).float()
    return out


# ---------------------------------------------------------------- prompts from tasks
def task_prompts(task_name: str, tokenizer, n: int, max_length: int) -> list[str]:
    """The first n training prompts of a task (classification: the prompt before the label; text: its start)."""
    from patchlm.data import load_task
    from patchlm.data.features import encode_prompt, example_text

    task = load_task(task_name)
    out = []
    for e in task.train[:n]:
        if task.kind == "classification":
            ids = encode_prompt(tokenizer, task, e, max_length)
        else:
            ids = tokenizer(example_text(task, e, tokenizer), add_special_tokens=False)["input_ids"][:max_length]
        out.append(tokenizer.decode(ids))
    return out


def expert_task(expert: Expert, patch: Patch | None) -> str | None:
    return expert.task or (patch.provenance.get("task") if patch is not None else None)


def resolve_prompts(experts: Sequence[Expert], patches: Sequence[Patch | None], tokenizer, cfg: MoeConfig
                    ) -> list[Expert]:
    """Experts with positive prompts filled in from their training tasks where none were given (prompted modes)."""
    if cfg.gate_mode not in PROMPTED:
        return list(experts)
    out = []
    for e, p in zip(experts, patches):
        if not e.positive_prompts:
            task = expert_task(e, p)
            if task is None:
                raise ConfigError(f"expert {e.source} has no positive prompts and no training task to take them "
                                  f"from: give its prompts (mergekit YAML positive_prompts) or its task, or use "
                                  f"gate mode random / uniform_random", field="gate_mode")
            e = replace(e, positive_prompts=task_prompts(task, tokenizer, cfg.prompts_per_task, cfg.max_length),
                        task=task)
        out.append(e)
    return out


# ---------------------------------------------------------------- the MoE
def mixtral_config(base_config: dict, num_experts: int, cfg: MoeConfig, dtype: str):
    """A MixtralConfig with every field of the base that Mixtral reads (rope, head_dim, norms, tying, ids)."""
    from transformers import MixtralConfig

    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "attention_dropout", "rope_parameters", "sliding_window")
    kw = {k: base_config[k] for k in keep if k in base_config}
    if "rope_parameters" not in kw:  # an older config.json: rope_theta / rope_scaling at the top level
        rope = dict(base_config.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = base_config.get("rope_theta", 10000.0)
        kw["rope_parameters"] = rope
    kw.setdefault("sliding_window", None)
    return MixtralConfig(**kw, num_local_experts=num_experts, num_experts_per_tok=cfg.top_k,
                         router_jitter_noise=cfg.router_jitter, architectures=["MixtralForCausalLM"], dtype=dtype)


def build_mixtral(config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A MixtralForCausalLM holding `state` (no random init of the experts: built on the meta device)."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PatchFormatError(f"MoE state does not fit Mixtral: missing {sorted(set(missing) - tied)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers are computed, not stored
    model.eval()
    return model


def _dtype_name(cfg: MoeConfig, base_config: dict) -> str:
    if cfg.dtype:
        return cfg.dtype
    d = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32").removeprefix("torch.")
    return d if d in ("float32", "bfloat16", "float16") else "float32"


def upcycle(base_ref: str, experts: Sequence[Expert], config: MoeConfig | None = None, *, base=None,
            log: Callable[[str], None] | None = None) -> Upcycled:
    """Build the MoE: checks, specialists' weights, gate vectors, the Mixtral model (routers untrained)."""
    from patchlm.models import load_base
    from patchlm.models.checkpoint import Checkpoint

    cfg = config or MoeConfig()
    log = log or (lambda _: None)
    experts = list(experts)
    if not experts:
        raise ConfigError("no specialists: give at least one --patch or --model")
    if cfg.top_k > len(experts):
        raise ConfigError(f"top_k {cfg.top_k} is larger than the number of experts ({len(experts)})", field="top_k")
    base_ck = Checkpoint(base_ref if base is None or base.path is None else base.path)
    check_family(base_ck.config, f"the base {base_ref}")
    patches: list[Patch | None] = [e.load_patch() for e in experts]
    base = base or load_base(base_ref)
    for p in patches:  # refuse a wrong base before any work
        if p is not None and p.base.get("fingerprint") and p.base["fingerprint"] != base.fingerprint:
            raise BaseMismatchError(
                f"specialist {p.path} was made for base {p.base.get('name')} (fingerprint {p.base['fingerprint']}), "
                f"but the base {base_ref} has fingerprint {base.fingerprint}")
    experts = resolve_prompts(experts, patches, base.tokenizer, cfg)
    L = int(base_ck.config["num_hidden_layers"])
    base_sd = {k: v.detach().float() for k, v in base.model.state_dict().items()}
    linears = _linear_names(base.model)
    need = [n for n in linears if n != "lm_head"] if cfg.shared == "average" else \
        [n for n in linears if any(n.endswith(f"mlp.{m}") for m in MLP)]
    weights = []
    for e, p in zip(experts, patches):
        log(f"specialist {e.source}")
        if p is not None:
            weights.append(patch_weights(p, base, need))
        else:
            got = checkpoint_weights(e.source, base, base_ck.config, [f"{n}.weight" for n in need])
            weights.append({n[: -len(".weight")]: t for n, t in got.items()})
    log(f"gates ({cfg.gate_mode})")
    gen = torch.Generator().manual_seed(cfg.seed)
    gates = gate_vectors(cfg.gate_mode, base.model, base.tokenizer, experts, generator=gen)  # [L, E, h]
    state = {}
    for k, v in base_sd.items():
        if ".mlp." in k:
            continue
        module = k[: -len(".weight")] if k.endswith(".weight") else None
        if cfg.shared == "average" and module in weights[0]:
            state[k] = torch.stack([w[module] for w in weights]).mean(0)
        else:
            state[k] = v
    for i in range(L):
        ups, downs = [], []
        for e, w in zip(experts, weights):
            parts = {}
            for m in ("gate_proj", "down_proj", "up_proj"):  # mergekit-moe's order (its noise draws follow it)
                t = w[f"model.layers.{i}.mlp.{m}"]
                scale = e.noise_scale if e.noise_scale is not None else (cfg.expert_noise or None)
                if scale:
                    t = t + torch.randn(t.shape, generator=gen) * scale
                if m == "down_proj" and e.residual_scale is not None:
                    t = t * e.residual_scale
                parts[m] = t
            ups.append(torch.cat([parts["gate_proj"], parts["up_proj"]], 0))
            downs.append(parts["down_proj"])
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(ups)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(downs)
        state[f"model.layers.{i}.mlp.gate.weight"] = gates[i].float()
    dtype = _dtype_name(cfg, base_ck.config)
    mcfg = mixtral_config(base_ck.config, len(experts), cfg, dtype)
    if mcfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dt = getattr(torch, dtype)
    model = build_mixtral(mcfg, {k: v.to(dt).contiguous() for k, v in state.items()})
    report = {
        "base": {"name": base_ref, "architecture": base.architecture, "fingerprint": base.fingerprint},
        "experts": [{"source": e.source, "kind": p.kind if p is not None else "checkpoint",
                     "task": expert_task(e, p), "positive_prompts": len(e.positive_prompts or []),
                     "negative_prompts": len(e.negative_prompts or [])} for e, p in zip(experts, patches)],
        "gate_mode": cfg.gate_mode, "top_k": cfg.top_k, "shared": cfg.shared, "dtype": dtype,
        **param_counts(model), "config": {k: v for k, v in json.loads(mcfg.to_json_string()).items()
                                          if k in ("rope_parameters", "head_dim", "tie_word_embeddings",
                                                   "rms_norm_eps", "sliding_window")},
    }
    report["expert_tasks"] = [expert_task(e, p) for e, p in zip(experts, patches)]
    return Upcycled(model, base.tokenizer, report)


def param_counts(model: torch.nn.Module) -> dict:
    """Total parameters (tied ones once) and those active per token (top_k of the experts in each layer)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    c = model.config
    inactive = (c.num_local_experts - c.num_experts_per_tok) * _expert_size(c) * c.num_hidden_layers
    return {"total_params": total, "active_params": total - inactive}


def _expert_size(config) -> int:
    """Parameters of one SwiGLU expert (gate, up and down projections)."""
    return 3 * config.hidden_size * config.intermediate_size


class ExpertHits:
    """Within `with ExpertHits(model) as hits:`, each call of a fused experts module (transformers 5's
    `experts(hidden_states, top_k_index, top_k_weights)`) records its token count and how many distinct experts its
    tokens were routed to. An expert that receives no token costs nothing: its weights are not read. So a forward's
    weight traffic is the touched parameters (every expert hit by at least one token), not the active ones (top_k
    per token): at batch 1 decoding touches top_k experts per layer, a long prefill or a batch touches them all."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls: list[tuple[int, int, int]] = []  # (tokens, distinct experts hit, experts)
        self._handles: list = []

    def __enter__(self) -> ExpertHits:
        def hook(mod, args):
            top = args[1] if len(args) > 1 else None
            if isinstance(top, torch.Tensor):
                n = int(mod.gate_up_proj.shape[0])
                hit = int(torch.unique(top[(top >= 0) & (top < n)]).numel())
                self.calls.append((int(args[0].reshape(-1, args[0].shape[-1]).shape[0]), hit, n))

        for m in self.model.modules():
            if is_fused_experts(m):
                self._handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hit_fraction(self, tokens: int | None = None) -> float | None:
        """Mean share of the experts hit per experts call (only calls of `tokens` tokens, when given)."""
        sel = [(h, n) for t, h, n in self.calls if tokens is None or t == tokens]
        return sum(h / n for h, n in sel) / len(sel) if sel else None

    def touched_params(self, tokens: int | None = None) -> int | None:
        """Parameters a forward reads: all but the experts no token was routed to (mean over the recorded calls)."""
        frac = self.hit_fraction(tokens)
        if frac is None:
            return None
        c = self.model.config
        experts = c.num_local_experts * _expert_size(c) * c.num_hidden_layers
        return round(param_counts(self.model)["total_params"] - (1 - frac) * experts)


def write_mixtral(model: torch.nn.Module, tokenizer, out: str | Path, force: bool = False,
                  extra: dict[str, str] | None = None) -> Path:
    """Write a Mixtral with the fused keys of transformers 5 (its save_pretrained writes the legacy per-expert
    w1/w2/w3 layout), its config and tokenizer, atomically; `extra` adds small text files (name -> text)."""
    from safetensors.torch import save_file

    from patchlm.paths import atomic_dir, check_output

    out = check_output(out, force)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with atomic_dir(out, force=force) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return out


def save_upcycled(up: Upcycled, out: str | Path, force: bool = False) -> Path:
    """Write the MoE as a plain transformers checkpoint (fused keys), with the tokenizer and the report."""
    return write_mixtral(up.model, up.tokenizer, out, force=force,
                         extra={"patchlm_moe.json": json.dumps(up.report, indent=2, default=str) + "\n"})
