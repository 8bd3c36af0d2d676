"""Prefix tuning (Li & Liang, 2021) without the reparameterisation MLP: trainable keys and values per layer.

The patch holds one tensor, `prefix_embeddings` [n, num_layers * 2 * token_dim], in PEFT's layout (PEFT's
`PrefixEncoder.embedding.weight` with prefix_projection=False): row t is virtual token t; its columns are
(layer, key|value, head, head dim) in that order, token_dim = KV heads x head dim (grouped-query attention
stores the KV heads only, as PEFT does). Attached, the prefix is the attention cache every sequence starts from
(positions 0..n-1, the input at n..n+T-1, the mask extended by n ones): see `patchlm.adapters.virtual`.

Init from the seed: "vocab" (default) puts there the keys and values the model itself computes for n tokens
sampled from the vocabulary, as MeZO and ZO-Bench initialise prefixes ("real activations"); "random" is PEFT's
N(0, 1); "zero" is PEFT's init_weights="zero".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchlm.adapters.config import check_positive_int, from_spec, to_spec
from patchlm.adapters.virtual import (
    VirtualTable,
    VirtualTokensKind,
    backbone_of,
    cache_kwarg,
    check_free,
    freeze_base,
    install,
    kv_geometry,
    new_cache,
    sample_token_ids,
)
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import register_kind
from patchlm.typed import check_fields

TENSOR = "prefix_embeddings"
ATTR = "patchlm_prefix"
PREFIX_INITS = ("vocab", "random", "zero")


@dataclass
class PrefixConfig:
    """Prefix-tuning hyper-parameters: a prefix patch's spec, the `--method prefix` options, a recipe's spec."""

    num_virtual_tokens: int = field(default=5, metadata={"help": "prefix tuning: virtual tokens (key/value "
                                                                 "pairs) in front of every layer's attention"})
    init: str = field(default="vocab", metadata={
        "help": "prefix init: vocab (the keys/values of sampled vocabulary tokens, as MeZO) | random (N(0, 1), "
                "PEFT's) | zero"})
    num_layers: int | None = field(default=None, metadata={
        "cli": False, "help": "decoder layers the prefix covers: filled in when the patch is made"})
    num_attention_heads: int | None = field(default=None, metadata={
        "cli": False,
        "help": "key/value heads per layer (PEFT's num_attention_heads): filled in when the patch is made"})
    token_dim: int | None = field(default=None, metadata={
        "cli": False, "help": "key/value heads x head dim (PEFT's token_dim): filled in when the patch is made"})

    def __post_init__(self):
        check_fields(self)
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens", "prefix tuning")
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"unknown prefix init {self.init!r}; choices: {', '.join(PREFIX_INITS)}", field="init")


def pack(keys_values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer (keys, values) of one sequence, each [heads, n, head_dim], as PEFT's [n, layers * 2 * heads * dim]."""
    stacked = torch.stack([torch.stack([k, v]) for k, v in keys_values])  # [L, 2, H, n, d]
    n = stacked.shape[3]
    return stacked.permute(3, 0, 1, 2, 4).reshape(n, -1).contiguous()


def unpack(table: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """PEFT's [n, layers * 2 * heads * dim] as [2 * layers, heads, n, dim]: row 2l holds layer l's keys, 2l+1 its
    values."""
    n = table.shape[0]
    return table.view(n, 2 * layers, heads, -1).permute(1, 2, 0, 3)


@torch.no_grad()
def vocab_prefix(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    """The keys/values the model computes for `n` vocabulary tokens sampled from `seed`, in PEFT's layout (fp32)."""
    bb = backbone_of(model)
    layers = kv_geometry(model)[0]
    device = model.get_input_embeddings().weight.device
    ids = sample_token_ids(model, n, seed).to(device)[None]
    cache = new_cache(bb)
    was = model.training
    model.eval()
    try:
        bb(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_kwarg(bb): cache})
    finally:
        model.train(was)
    kv = [(cache.layers[i].keys[0, :, -n:].float(), cache.layers[i].values[0, :, -n:].float()) for i in range(layers)]
    return pack(kv).cpu()


def _model_dtype(bb) -> torch.dtype:
    dtype = getattr(bb, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else bb.get_input_embeddings().weight.dtype


@register_kind("prefix", stage="weight", capabilities=("export-peft",))
class PrefixKind(VirtualTokensKind):
    """spec: PrefixConfig's fields (the KV geometry filled in) and the init seed."""

    ATTR, TENSOR = ATTR, TENSOR

    def attach(self, model, spec, tensors=None, seed=0):
        cfg = from_spec(PrefixConfig, dict(spec), "prefix", strict=tensors is None)
        check_free(model, ATTR, "prefix")
        layers, heads, head_dim = kv_geometry(model)
        n, width = int(cfg.num_virtual_tokens), layers * 2 * heads * head_dim
        for name, want in (("num_layers", layers), ("num_attention_heads", heads), ("token_dim", heads * head_dim)):
            got = getattr(cfg, name)
            if got is not None and int(got) != want:
                raise PatchFormatError(f"prefix patch has {name}={got} but the model has {want}: patch made for "
                                       "another architecture")
        if tensors is not None:
            t = tensors.get(TENSOR)
            if t is None:
                raise PatchFormatError(f"prefix patch has no tensor {TENSOR!r}")
            if tuple(t.shape) != (n, width):
                raise PatchFormatError(f"prefix tensor has shape {tuple(t.shape)}, but {n} virtual tokens on this "
                                       f"model need ({n}, {width}): patch made for another architecture")
            init = t.float()
        elif cfg.init == "vocab":
            init = vocab_prefix(model, n, seed)
        elif cfg.init == "random":
            init = torch.randn((n, width), generator=torch.Generator().manual_seed(int(seed)))
        else:
            init = torch.zeros(n, width)
        device = model.get_input_embeddings().weight.device
        table = VirtualTable(n, width, device=device)
        with torch.no_grad():
            table.weight.copy_(init)

        def begin(bb, cache, batch):
            kv = unpack(table().to(_model_dtype(bb)), layers, heads)
            cache = new_cache(bb)
            for i in range(layers):
                cache.update(kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1),
                             kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
            return cache

        install(model, ATTR, table, n, "prefix", begin)
        freeze_base(model, table)
        resolved = to_spec(cfg, num_layers=layers, num_attention_heads=heads, token_dim=heads * head_dim)
        return {**spec, **resolved, "seed": int(seed) if tensors is None else spec.get("seed", seed)}

    def summary(self, spec, tensors):
        return {"num_virtual_tokens": spec.get("num_virtual_tokens"), "num_layers": spec.get("num_layers"),
                "kv_heads": spec.get("num_attention_heads"), "token_dim": spec.get("token_dim")}
