"""Virtual tokens in front of the input: what prefix tuning and prompt tuning share.

Each kind keeps one trainable table in a small leaf module (`VirtualTable`) registered on the backbone, so the
table is in `model.named_parameters()`, `torch.func.functional_call` can swap it and the zeroth-order perturber
hooks its forward. A forward pre-hook on the backbone (the decoder stack: `model.model` for Llama) adds the virtual
tokens to every call that starts a sequence (no cache passed, or an empty one), whichever way the model is called:
`model(...)`, the backbone alone (the engine's loss) or `model.generate(...)`. The rules are PEFT's
(`PeftModelForCausalLM.forward` / `prepare_inputs_for_generation`, PEFT 0.21):
- the attention mask gets `n` ones in front; a cache passed in is taken to hold the virtual tokens already, and
  the mask is extended only when its length is the cache's plus the input's minus `n` (the caller's own length);
- prefix tuning: the prefix is the cache (keys/values at positions 0..n-1), so the input sits at positions
  n..n+T-1; position ids given by the caller are shifted by `n`; with use_cache=False the prefix cache made for
  the call is not returned (as the base returns none), so `generate(use_cache=False)` starts afresh each step;
- prompt tuning: the virtual embeddings are prepended to the input embeddings and position ids given by the
  caller are dropped (PEFT ignores them); a forward hook strips the `n` virtual positions from the backbone's
  outputs, so every caller sees its own sequence length again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from patchlm.errors import PatchFormatError, PatchlmError
from patchlm.patch import PatchKind

CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache
# PEFT builds the prefix cache from the model's config (layer types) only for these families; else a plain cache
_CONFIG_CACHE_TYPES = ("gemma2", "gemma3_text", "gemma4")


class VirtualTable(nn.Module):
    """A trainable float32 table [rows, width]; its forward returns it, so forward hooks see each read of it."""

    def __init__(self, rows: int, width: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(int(rows), int(width), dtype=torch.float32, device=device))

    def forward(self) -> torch.Tensor:
        return self.weight


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (`model.model` for Llama); the model itself when it has no head."""
    bb = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return bb if isinstance(bb, nn.Module) and bb is not model else model


def text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise PatchFormatError(f"a {type(model).__name__} has no config: cannot size virtual tokens for it")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim): the shape of one layer's keys is [batch, heads, seq, head dim].

    For grouped-query attention the heads are the key/value heads, as PEFT's `_prepare_prompt_learning_config`
    sets them for prefix tuning (token_dim = head_dim x num_key_value_heads, num_attention_heads = KV heads)."""
    cfg = text_config(model)
    layers, heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return layers, kv, head_dim


def sample_token_ids(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """`n` token ids drawn uniformly from the vocabulary with a generator seeded by `seed` (CPU, int64)."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (int(n),), generator=torch.Generator().manual_seed(int(seed)))


def new_cache(backbone: nn.Module):
    """An empty cache of the kind PEFT builds for the prefix: from the config for Gemma 2/3/4, else plain."""
    from transformers import DynamicCache

    cfg = getattr(backbone, "config", None)
    model_type = getattr(cfg, "model_type", "") or ""
    if any(t in model_type for t in _CONFIG_CACHE_TYPES):
        return DynamicCache(config=cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg)
    return DynamicCache()


def cache_kwarg(module: nn.Module) -> str:
    """The name the module's forward takes its cache by: `cache` (transformers >= 5.24) or `past_key_values`."""
    params = inspect.signature(module.forward).parameters
    return next((k for k in CACHE_KWARGS if k in params), CACHE_KWARGS[0])


def _positional_names(module: nn.Module) -> list[str]:
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


class VirtualTokens:
    """The hooks that put `n` virtual tokens in front of every sequence the backbone starts (see the module doc).

    mode "prefix": `begin(backbone, cache, batch)` fills the cache with the prefix; mode "prompt": `begin` returns
    the [batch, n, hidden] embeddings to prepend."""

    def __init__(self, backbone: nn.Module, table: VirtualTable, n: int, mode: str,
                 begin: Callable[[nn.Module, object, int], object]):
        if mode not in ("prefix", "prompt"):
            raise ValueError(f"mode must be prefix or prompt, got {mode!r}")
        self.backbone, self.table, self.n, self.mode, self.begin = backbone, table, int(n), mode, begin
        self.arg_names, self.cache_key = _positional_names(backbone), cache_kwarg(backbone)
        self.injected = False  # set by the pre-hook when this call prepended prompt embeddings
        self.drop_cache = False  # set when this call made the prefix cache but the caller asked for no cache
        self.handles = [backbone.register_forward_pre_hook(self._pre, with_kwargs=True),
                        backbone.register_forward_hook(self._post, with_kwargs=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, module, args, kwargs):
        self.injected = self.drop_cache = False
        if len(args) > len(self.arg_names):
            raise PatchlmError(f"{type(module).__name__} called with {len(args)} positional arguments: the "
                               f"{self.mode} patch needs them by name")
        kw = dict(kwargs)
        for name, value in zip(self.arg_names, args):
            kw[name] = value
        for alias in CACHE_KWARGS:  # one name for the cache, whichever the caller used
            if alias != self.cache_key and alias in kw:
                value = kw.pop(alias)
                if kw.get(self.cache_key) is None:
                    kw[self.cache_key] = value
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        x = embeds if embeds is not None else ids
        if x is None:
            return (), kw
        batch, q = int(x.shape[0]), int(x.shape[1])
        cache = kw.get(self.cache_key)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:  # a sequence starts here: add the virtual tokens
            if self.mode == "prefix":
                use_cache = kw.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(getattr(module, "config", None), "use_cache", True)
                self.drop_cache = cache is None and not use_cache  # the base would return no cache here
                cache = self.begin(module, cache, batch)
                kw[self.cache_key] = cache
            else:
                if embeds is None:
                    embeds = module.get_input_embeddings()(ids)
                prompts = self.begin(module, None, batch).to(embeds.dtype)
                kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
                kw["input_ids"] = None
                q += self.n
                self.injected = True
        seen = cache.get_seq_length() if cache is not None else 0
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == seen + q - self.n:
            ones = torch.ones(mask.shape[0], self.n, dtype=mask.dtype, device=mask.device)
            kw["attention_mask"] = torch.cat([ones, mask], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + self.n if self.mode == "prefix" else None
        return (), kw

    def _post(self, module, args, kwargs, output):
        if self.drop_cache:  # use_cache=False: the prefix cache must not leak out (generate would carry it on)
            self.drop_cache = False
            if not isinstance(output, tuple):
                output = type(output)(**{k: v for k, v in output.items() if k not in CACHE_KWARGS})
            if not self.injected:
                return output
        if not self.injected:
            return None
        self.injected = False
        n = self.n
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]
        hidden = output.get("hidden_states")
        if hidden is not None:
            output.hidden_states = tuple(h[:, n:] for h in hidden)
        return output


def check_free(model: nn.Module, attr: str, mode: str) -> None:
    """Refuse a second patch of the same kind on one model."""
    if attr in backbone_of(model)._modules:
        raise PatchlmError(f"this model already has a {mode} patch attached: detach it first")


def install(model: nn.Module, attr: str, table: VirtualTable, n: int, mode: str, begin) -> None:
    """Register `table` as `backbone.<attr>` and the hooks."""
    check_free(model, attr, mode)
    bb = backbone_of(model)
    bb.add_module(attr, table)
    table._patchlm_hooks = VirtualTokens(bb, table, n, mode, begin)


def table_of(model: nn.Module, attr: str) -> VirtualTable | None:
    return backbone_of(model)._modules.get(attr)


def uninstall(model: nn.Module, attr: str) -> None:
    """Remove the hooks and the table: the model is the base again, exactly."""
    bb = backbone_of(model)
    table = bb._modules.get(attr)
    if table is None:
        return
    hooks = getattr(table, "_patchlm_hooks", None)
    if hooks is not None:
        hooks.remove()
    del bb._modules[attr]


def freeze_base(model: nn.Module, table: VirtualTable) -> None:
    """Only the virtual table trains (as PEFT's prompt-learning models freeze the base)."""
    for p in model.parameters():
        p.requires_grad_(False)
    table.weight.requires_grad_(True)


class VirtualTokensKind(PatchKind):
    """What prefix and prompt tuning share: one trainable table on the backbone under ATTR, saved as TENSOR."""

    ATTR: ClassVar[str] = ""
    TENSOR: ClassVar[str] = ""

    def detach(self, model):
        uninstall(model, self.ATTR)

    def state(self, model):
        table = table_of(model, self.ATTR)
        if table is None:
            return {}
        return {self.TENSOR: table.weight.detach().float().cpu().clone()}

    def trainable_parameters(self, model):
        table = table_of(model, self.ATTR)
        return [] if table is None else [table.weight]
