"""Real removal and skipping of sub-layers inside a transformers decoder layer.

A managed layer keeps its class (a subclass is swapped in, so `isinstance` checks and module names are
unchanged: LoRA patches and state dicts still match) and gets a `DepthState`:
  * a dropped attention/MLP sub-layer is taken out of the module tree (stashed for `restore`) and computes
    nothing: the residual add is skipped, not fed zeros;
  * the remaining attention modules are renumbered 0..K-1 so the KV cache only ever holds K layers
    (DynamicCache allocates a layer on its first update; the tail layers stay empty);
  * a router (MindSkip) decides per sequence whether the attention runs: in eval the batch is split and only
    the selected sequences go through attention (and into its cache layer); the prefill decision is kept per
    cache object and reused while decoding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from patchlm.depth.arch import backbone, decoder_layers, family
from patchlm.errors import ConfigError


@dataclass
class DepthState:
    attn_dropped: bool = False
    mlp_dropped: bool = False
    router: nn.Module | None = None
    stash: dict = field(default_factory=dict)      # dropped modules, by attribute name
    orig_class: type | None = None
    context: RouteContext | None = None


class RouteContext:
    """What routers need from the model call: the 2-D padding mask (captured by a pre-hook on the backbone)."""

    def __init__(self):
        self.mask2d: torch.Tensor | None = None
        self.handle = None


_CLASSES: dict[type, type] = {}


def _depth_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Depth{cls.__name__}", (_DepthForward, cls), {})
    return _CLASSES[cls]


def _index_rows(x, idx: torch.Tensor, batch: int):
    """Select rows `idx` of tensors whose first dim is the batch (broadcast dims of size 1 are kept)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, idx) if x.dim() > 0 and x.shape[0] == batch and batch > 1 else x
    if isinstance(x, tuple):
        return tuple(_index_rows(t, idx, batch) for t in x)
    return x


class _DepthForward:
    """Mixin whose forward replaces a Llama-shaped decoder layer's forward (pre-norm, two residual adds)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        st: DepthState = self._depth
        h = hidden_states
        if not st.attn_dropped:
            # transformers < 5.24 passes the cache as `past_key_values`, later versions as `cache`: pass it on
            # under the name it came with
            cache_kw = {"past_key_values": past_key_values} if "cache" not in kwargs else {}
            h = self._attention(h, st, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=use_cache, position_embeddings=position_embeddings, **cache_kw, **kwargs)
        if not st.mlp_dropped:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h

    def _attention(self, h, st, **kw):
        x = self.input_layernorm(h)
        router = st.router
        if router is None:
            return h + self.self_attn(hidden_states=x, **kw)[0]
        cache_name = "cache" if "cache" in kw else "past_key_values"
        gate = router.gate(x, st.context, kw.get(cache_name))
        if gate.differentiable:  # training: compute everything, multiply by the straight-through mask
            return h + gate.mask.to(h.dtype) * self.self_attn(hidden_states=x, **kw)[0]
        if gate.token_level:  # token-level routing is masked (no compute saved): a study variant
            return h + gate.mask.to(h.dtype) * self.self_attn(hidden_states=x, **kw)[0]
        keep = gate.keep  # bool [B]
        n = int(keep.sum())
        if n == keep.numel():
            return h + self.self_attn(hidden_states=x, **kw)[0]
        if n == 0:
            return h
        idx = keep.nonzero().flatten()
        b = h.shape[0]
        sub = {k: _index_rows(v, idx, b) for k, v in kw.items() if k != cache_name}
        sub[cache_name] = kw.get(cache_name)
        out = self.self_attn(hidden_states=x.index_select(0, idx), **sub)[0]
        return h.index_add(0, idx, out.to(h.dtype))


def _ensure_managed(layer: nn.Module) -> DepthState:
    st = getattr(layer, "_depth", None)
    if st is None:
        st = DepthState(orig_class=type(layer))
        layer._depth = st
        layer.__class__ = _depth_class(type(layer))
    return st


def _release_if_idle(layer: nn.Module) -> None:
    st = getattr(layer, "_depth", None)
    if st is None:
        return
    if not st.attn_dropped and not st.mlp_dropped and st.router is None:
        layer.__class__ = st.orig_class
        del layer._depth


def _stash(layer: nn.Module, names, st: DepthState) -> None:
    for n in names:
        if n in layer._modules:
            st.stash[n] = layer._modules.pop(n)


def _unstash(layer: nn.Module, names, st: DepthState) -> None:
    for n in names:
        if n in st.stash:
            layer._modules[n] = st.stash.pop(n)


def _attn_module(layer: nn.Module, st: DepthState | None):
    if "self_attn" in layer._modules:
        return layer._modules["self_attn"]
    return st.stash.get("self_attn") if st else None


def renumber_attention(model: nn.Module) -> int:
    """Give the remaining attention modules cache indices 0..K-1 (in layer order); return K.

    A dropped attention keeps its layer position as index (it is never called). With nothing dropped the
    indices are the layer positions again, as transformers builds them.
    """
    k = 0
    for i, layer in enumerate(decoder_layers(model)):
        st = getattr(layer, "_depth", None)
        attn = _attn_module(layer, st)
        if st is not None and st.attn_dropped:
            attn.layer_idx = i
            continue
        attn.layer_idx = k
        k += 1
    return k


def apply_drops(model: nn.Module, attention: list[int], mlp: list[int]) -> None:
    """Remove the listed attention and MLP sub-layers (a block = both). Replaces any previous drops."""
    fam = family(model, "dropping")
    layers = decoder_layers(model)
    n = len(layers)
    attention, mlp = set(attention), set(mlp)
    if len(attention) >= n and len(mlp) >= n:
        raise ConfigError(f"cannot drop every layer ({n} of {n}): keep at least one attention layer")
    if len(attention) >= n:
        raise ConfigError(f"cannot drop all {n} attention layers: at least one must remain (it carries the "
                          "cache length)")
    routed = sorted(i for i in attention if getattr(getattr(layers[i], "_depth", None), "router", None) is not None)
    if routed:
        raise ConfigError(f"attention layer {routed[0]} has a MindSkip router: drop it before routing, "
                          "or route other layers")
    first = min(i for i in range(n) if i not in attention)
    if getattr(getattr(layers[first], "_depth", None), "router", None) is not None:
        raise ConfigError(f"dropping these layers makes routed layer {first} the first attention layer, which "
                          "holds the cache length and cannot be routed; drop fewer early attention layers")
    restore_drops(model)
    for i, layer in enumerate(layers):
        a, m = i in attention, i in mlp
        if not (a or m):
            continue
        st = _ensure_managed(layer)
        if a:
            st.attn_dropped = True
            _stash(layer, fam.attn_parts, st)
        if m:
            st.mlp_dropped = True
            _stash(layer, fam.mlp_parts, st)
    renumber_attention(model)


def restore_drops(model: nn.Module) -> None:
    """Put every dropped sub-layer back and restore the original cache indices."""
    fam = family(model, "dropping")
    for layer in decoder_layers(model):
        st = getattr(layer, "_depth", None)
        if st is None:
            continue
        if st.attn_dropped:
            _unstash(layer, fam.attn_parts, st)
            st.attn_dropped = False
        if st.mlp_dropped:
            _unstash(layer, fam.mlp_parts, st)
            st.mlp_dropped = False
        _release_if_idle(layer)
    renumber_attention(model)


def dropped(model: nn.Module) -> tuple[list[int], list[int]]:
    """(dropped attention indices, dropped MLP indices) currently applied."""
    a, m = [], []
    for i, layer in enumerate(decoder_layers(model)):
        st = getattr(layer, "_depth", None)
        if st is not None:
            if st.attn_dropped:
                a.append(i)
            if st.mlp_dropped:
                m.append(i)
    return a, m


# ---------------------------------------------------------------- routers
def install_routers(model: nn.Module, routers: dict[int, nn.Module]) -> None:
    """Put a router on the attention of each listed layer (and the padding-mask hook on the backbone)."""
    family(model, "routing")
    layers = decoder_layers(model)
    kept = [i for i, layer in enumerate(layers) if not getattr(getattr(layer, "_depth", None), "attn_dropped", False)]
    for i in sorted(routers):
        if i not in kept:
            raise ConfigError(f"cannot route attention layer {i}: it is dropped by a drop patch")
        if i == kept[0]:
            raise ConfigError(f"cannot route attention layer {i}: it is the first remaining attention layer, "
                              "which holds the cache length; route later layers")
    remove_routers(model)
    ctx = RouteContext()

    def grab_mask(_mod, args, kwargs):
        m = kwargs.get("attention_mask")
        ctx.mask2d = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None

    ctx.handle = backbone(model).register_forward_pre_hook(grab_mask, with_kwargs=True)
    for i, r in routers.items():
        st = _ensure_managed(layers[i])
        st.router = r
        st.context = ctx
        layers[i]._modules["router"] = r


def remove_routers(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        st = getattr(layer, "_depth", None)
        if st is None or st.router is None:
            continue
        if st.context is not None and st.context.handle is not None:
            st.context.handle.remove()
            st.context.handle = None
        layer._modules.pop("router", None)
        st.router, st.context = None, None
        _release_if_idle(layer)


def routers(model: nn.Module) -> dict[int, nn.Module]:
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        st = getattr(layer, "_depth", None)
        if st is not None and st.router is not None:
            out[i] = st.router
    return out


def cache_key(cache) -> weakref.ref | None:
    if cache is None:
        return None
    try:
        return weakref.ref(cache)
    except TypeError:
        return None
