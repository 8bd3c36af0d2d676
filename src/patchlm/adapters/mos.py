"""MoS, Mixture of Shards: LoRA-quality adapters from global shard pools shared across layers.

Construction (per projection type t, e.g. every layer's ``q_proj``; L = number of layers of that type)::

    PoolA_t: N x (d_in / l)      PoolB_t: N x (d_out / l)      N = e * L * l shards
    rows [0, N_pub) are public,  N_pub = (e - p) * L * l;  rows [N_pub, N) are private, p*l per layer
    layer i:  idxA_i = perm_i(N_pub)[:(r-p)*l] ++ [N_pub + i*p*l, N_pub + (i+1)*p*l)
              idxB_i = an independent draw of the same form
    A_i = PoolA_t[idxA_i].view(r, d_in)    (row j of A_i = shards j*l .. j*l+l-1 concatenated)
    B_i = PoolB_t[idxB_i].view(r, d_out)^T
    y = W x + (alpha / r) * B_i A_i dropout(x)

The trainable parameters are the pools: e * L * (d_in + d_out) per projection type, exactly what LoRA at
rank ``e`` trains. Index buffers are drawn once from the seed and frozen (no learned router).

The four differentiation strategies, each on by default and each switchable off (``spec`` booleans):

- ``subset_selection`` off: every layer of a type uses the *same* public indices (the draw layer 0 gets
  with it on), instead of each layer drawing its own subset. The pool keeps its size, so the trainable
  count is unchanged; public rows no layer selects get no gradient (that loss is what the ablation measures).
- ``pair_dissociation`` off: ``idxB = idxA`` (A and B use the same pool positions) instead of an
  independent draw for B. Nothing else changes.
- ``vector_sharding`` off: ``l = 1`` whatever ``l`` says: shards are whole rank vectors. N = e*L rows of
  full width, so the trainable count is unchanged.
- ``privatization`` off: ``p = 0``: no private region, the whole pool is public. N is unchanged.

All four off is pure sharing: one fixed set of r whole vectors per type, the same in every layer, with
B tied to A's positions. The pool size (the budget) is identical in every ablation.

Saved tensors (compact: never a materialized LoRA): ``mos.<type>.pool_A``, ``mos.<type>.pool_B`` (float32)
and ``mos.<type>.idx_A``, ``mos.<type>.idx_B`` ([L, r*l] int16/int32, the frozen indices, so a load never
depends on the RNG of a future torch; they are also re-derivable from ``spec["seed"]``). ``<type>`` is the
module name with its layer number replaced by ``*`` (``model.layers.*.self_attn.q_proj``).
:func:`MosKind.materialize` gives an ordinary LoRA patch computing the same function (for merging, PEFT export).

Speed: each module builds its A and B with one ``index_select`` + ``view`` per forward (no Python loop over
shards). For smollm2-135m (210 modules, r=16, l=4) the gathers and their backward scatters cost about 9 ms per
training step on the 2-core dev CPU, 1-2% of a step; gathering all layers of a type in one call and slicing was
measured slower (about 2x for the gather part: the slices' backward), so it is not used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from patchlm.adapters.config import check_dropout, from_spec, to_spec
from patchlm.adapters.inject import has_module, replace_modules, resolve_targets, unwrap_modules, wrapped_modules
from patchlm.adapters.lora import TARGETS_HELP, default_alpha
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import Patch, PatchKind, provenance, register_kind
from patchlm.typed import check_fields

STRATEGIES = ("subset_selection", "pair_dissociation", "vector_sharding", "privatization")


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class MosConfig:
    """MoS hyper-parameters: a MoS patch's spec, the `patchlm train --method mos` options, a recipe's spec.

    `mos_config(spec)` gives the *effective* configuration (after the strategy switches: p=0 without
    privatization, l=1 without vector sharding; alpha resolved), which the construction uses."""

    r: int = field(default=16, metadata={"help": "MoS: rank of each module's A and B"})
    e: int = field(default=2, metadata={"help": "MoS: equivalent LoRA rank, the parameter budget"})
    p: int = field(default=1, metadata={"help": "MoS: private rank vectors per layer"})
    l: int = field(default=4, metadata={"help": "MoS: shards per rank vector"})
    alpha: float | None = field(default=None, metadata={"help": "scaling = alpha / r; unset: 2 x r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: str | list[str] = field(default="all-linear", metadata={"help": TARGETS_HELP})
    subset_selection: bool = field(default=True, metadata={
        "help": "MoS: each layer picks its own subset of public shards (off: all layers use the same ones)"})
    pair_dissociation: bool = field(default=True, metadata={
        "help": "MoS: A and B draw their shard indices independently (off: B uses A's indices)"})
    vector_sharding: bool = field(default=True, metadata={
        "help": "MoS: each rank vector is l concatenated shards (off: l=1, whole vectors)"})
    privatization: bool = field(default=True, metadata={
        "help": "MoS: each layer owns p private rank vectors (off: p=0, all shards public). All four off = pure "
                "sharing"})
    seed: int = field(default=0, metadata={"cli": False, "help": "seed of the index draws and the pool init"})

    @property
    def scaling(self) -> float:
        return (default_alpha(self.r) if self.alpha is None else float(self.alpha)) / self.r

    def __post_init__(self):
        check_fields(self)


def _as_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"MoS {key} must be an integer, got {value!r}", field=key)
    return int(value)


def mos_config(spec: dict, strict: bool = False) -> MosConfig:
    """Check a MoS spec (model-independent checks) and return its effective configuration."""
    given = from_spec(MosConfig, spec, "mos", strict=strict)
    r, e, p, l = (_as_int(getattr(given, k), k) for k in ("r", "e", "p", "l"))
    if r <= 0:
        raise ConfigError(f"MoS rank r must be positive, got r={r}; set r to 1 or more", field="r")
    if e <= 0:
        raise ConfigError(f"MoS equivalent rank e must be positive, got e={e}; set e to 1 or more", field="e")
    if l <= 0:
        raise ConfigError(f"MoS shards per vector l must be positive, got l={l}; set l to 1 or more", field="l")
    if p < 0:
        raise ConfigError(f"MoS private rank p must not be negative, got p={p}; set p to 0 or more", field="p")
    flags = {s: bool(getattr(given, s)) for s in STRATEGIES}
    if not flags["privatization"]:
        p = 0
    if not flags["vector_sharding"]:
        l = 1
    if p > e:
        raise ConfigError(f"MoS private rank p={p} exceeds the equivalent rank e={e} (the private region is p of "
                          f"the e rank vectors each layer owns); lower p or raise e", field="p")
    if p > r:
        raise ConfigError(f"MoS private rank p={p} exceeds the MoS rank r={r}; lower p or raise r", field="p")
    if p == e and r > p:
        raise ConfigError(f"MoS with p=e={e} leaves no public shards for the other r-p={r - p} rank vectors; "
                          f"lower p below e or set r to {p}", field="p")
    check_dropout(given.dropout, "MoS")
    alpha = default_alpha(r) if given.alpha is None else float(given.alpha)
    if alpha <= 0:
        raise ConfigError(f"MoS alpha must be positive, got {alpha} (unset: 2 x r)", field="alpha")
    return replace(given, r=r, e=e, p=p, l=l, alpha=alpha, dropout=float(given.dropout), seed=int(given.seed),
                   **flags)


def type_key(name: str) -> str:
    """The projection type of a module: its name with the layer number replaced by '*'."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def group_modules(names: list[str]) -> dict[str, list[str]]:
    """Projection type -> its module names in layer order (sorted types)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(type_key(n), []).append(n)

    def layer(n):
        m = re.search(r"\.(\d+)\.", n)
        return int(m.group(1)) if m else -1

    return {k: sorted(v, key=layer) for k, v in sorted(groups.items())}


def _check_group(cfg: MosConfig, key: str, L: int, d_in: int, d_out: int) -> None:
    for what, d in (("input", d_in), ("output", d_out)):
        if d % cfg.l:
            g = math.gcd(d_in, d_out)
            divisors = [k for k in range(1, 33) if g % k == 0]
            raise ConfigError(f"MoS shards per vector l={cfg.l} does not divide the {what} size {d} of {key}; "
                              f"set l to one of {divisors} (or target other modules)", field="l")
    n_pub, need = (cfg.e - cfg.p) * L * cfg.l, (cfg.r - cfg.p) * cfg.l
    if need > n_pub:
        raise ConfigError(f"MoS rank r={cfg.r} asks each layer of {key} for (r-p)*l={need} public shards but its "
                          f"pool holds only (e-p)*L*l={n_pub} (L={L} layers); lower r to at most "
                          f"{cfg.p + (cfg.e - cfg.p) * L} or raise e", field="r")


def _generator(seed: int, group: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + group * 7919 + stream * 104_729) % (2**62))


def draw_indices(cfg: MosConfig, L: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen index buffers of one projection type: idxA, idxB, each [L, r*l] (int64).

    Streams are separate for A and B so each switch changes only what it names: e.g. turning pair
    dissociation off leaves idxA as it was and sets idxB = idxA.
    """
    n_pub = (cfg.e - cfg.p) * L * cfg.l
    k_pub, k_priv = (cfg.r - cfg.p) * cfg.l, cfg.p * cfg.l

    def draw(stream: int) -> torch.Tensor:
        gen = _generator(cfg.seed, group, stream)
        rows = []
        shared = None
        for i in range(L):
            if cfg.subset_selection or shared is None:
                pub = torch.randperm(n_pub, generator=gen)[:k_pub] if k_pub else torch.empty(0, dtype=torch.long)
                shared = pub
            priv = torch.arange(n_pub + i * k_priv, n_pub + (i + 1) * k_priv, dtype=torch.long)
            rows.append(torch.cat([shared, priv]))
        return torch.stack(rows)

    idx_a = draw(0)
    idx_b = draw(1) if cfg.pair_dissociation else idx_a.clone()
    return idx_a, idx_b


# ---------------------------------------------------------------- the module
class MosLinear(nn.Module):
    """A frozen nn.Linear plus a MoS update built from shared pools by one gather per forward.

    ``pool_A`` / ``pool_B`` are the same nn.Parameter objects in every layer of a projection type
    (``model.parameters()`` lists each once); ``idx_A`` / ``idx_B`` are this layer's frozen indices.
    """

    def __init__(self, base: nn.Linear, pool_a: nn.Parameter, pool_b: nn.Parameter, idx_a: torch.Tensor,
                 idx_b: torch.Tensor, r: int, scaling: float, dropout: float, group: str, layer: int):
        super().__init__()
        self.base = base
        self.pool_A, self.pool_B = pool_a, pool_b
        dev = base.weight.device
        self.register_buffer("idx_A", idx_a.to(dev, torch.long), persistent=False)
        self.register_buffer("idx_B", idx_b.to(dev, torch.long), persistent=False)
        self.r, self.scaling, self.group, self.layer = r, float(scaling), group, layer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def lora_A(self) -> torch.Tensor:
        """This layer's A (r x d_in): one gather from the pool, then a view (shards concatenate)."""
        return self.pool_A.index_select(0, self.idx_A).view(self.r, self.base.in_features)

    def lora_B(self) -> torch.Tensor:
        """This layer's B (d_out x r)."""
        return self.pool_B.index_select(0, self.idx_B).view(self.r, self.base.out_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a = self.pool_A.index_select(0, self.idx_A).view(self.r, self.base.in_features)
        b = self.pool_B.index_select(0, self.idx_B).view(self.r, self.base.out_features)
        xd = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type) and xd.dtype != a.dtype:
            xd = xd.to(a.dtype)
        upd = torch.matmul(F.linear(xd, a), b) * self.scaling
        return y + upd.to(y.dtype)

    def delta(self) -> torch.Tensor:
        """dW = scaling * B A in float32."""
        return (self.lora_B().float() @ self.lora_A().float()) * self.scaling


# ---------------------------------------------------------------- the kind
def _pool_keys(key: str) -> tuple[str, str, str, str]:
    return (f"mos.{key}.pool_A", f"mos.{key}.pool_B", f"mos.{key}.idx_A", f"mos.{key}.idx_B")


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n < 2**15 else torch.int32



@register_kind("mos", stage="weight", capabilities=("materialize", "export-peft", "export-merged"))
class MosKind(PatchKind):
    """spec: MosConfig's fields (targets resolved to full module names; seed: the draws' seed). Trainable
    parameters: the pools, e*L*(d_in+d_out) per projection type (LoRA at rank e)."""

    def attach(self, model, spec, tensors=None, seed=0):
        spec = dict(spec)
        if tensors is None:
            spec["seed"] = int(seed)
        cfg = mos_config(spec, strict=tensors is None)
        if tensors is None:
            names = resolve_targets(model, cfg.targets)
        else:
            names = list(spec.get("targets") or [])
            if not names or isinstance(names, str):
                raise PatchFormatError("MoS patch spec has no resolved module list in 'targets'")
        missing = [n for n in names if not has_module(model, n)]
        if missing:
            raise PatchFormatError(f"MoS patch targets modules this model does not have: {', '.join(missing[:3])}")
        groups = group_modules(names)
        built: dict[str, MosLinear] = {}
        for g, (key, members) in enumerate(groups.items()):
            mods = [model.get_submodule(n) for n in members]
            for n, m in zip(members, mods):
                if not isinstance(m, nn.Linear):
                    raise PatchFormatError(f"module {n} is a {type(m).__name__}, not a Linear: cannot attach MoS")
            d_in, d_out = mods[0].in_features, mods[0].out_features
            if any((m.in_features, m.out_features) != (d_in, d_out) for m in mods):
                raise ConfigError(f"modules of type {key} differ in shape; MoS shares a pool per type, so they "
                                  "must match: target them separately", field="targets")
            L = len(members)
            _check_group(cfg, key, L, d_in, d_out)
            N = cfg.e * L * cfg.l
            dev = mods[0].weight.device
            ka, kb, kia, kib = _pool_keys(key)
            if tensors is not None:
                for k in (ka, kb, kia, kib):
                    if k not in tensors:
                        raise PatchFormatError(f"MoS patch is missing tensor {k}")
                pa, pb = tensors[ka].float(), tensors[kb].float()
                ia, ib = tensors[kia].long(), tensors[kib].long()
                want = {ka: (N, d_in // cfg.l), kb: (N, d_out // cfg.l), kia: (L, cfg.r * cfg.l),
                        kib: (L, cfg.r * cfg.l)}
                for k, t in ((ka, pa), (kb, pb), (kia, ia), (kib, ib)):
                    if tuple(t.shape) != want[k]:
                        raise PatchFormatError(f"MoS tensor {k} has shape {tuple(t.shape)} but this model and spec "
                                               f"need {want[k]}: patch made for another architecture or spec")
                if int(ia.min()) < 0 or int(ia.max()) >= N or int(ib.min()) < 0 or int(ib.max()) >= N:
                    raise PatchFormatError(f"MoS indices of {key} fall outside its pool of {N} shards")
            else:
                gen = _generator(cfg.seed, g, 2)
                bound = 1.0 / math.sqrt(d_in)  # LoRA's Kaiming-uniform(a=sqrt(5)) bound for an r x d_in matrix
                pa = (torch.rand(N, d_in // cfg.l, generator=gen) * 2 - 1) * bound
                pb = torch.zeros(N, d_out // cfg.l)
                ia, ib = draw_indices(cfg, L, g)
            pool_a = nn.Parameter(pa.to(dev, torch.float32).contiguous())
            pool_b = nn.Parameter(pb.to(dev, torch.float32).contiguous())
            for i, n in enumerate(members):
                built[n] = MosLinear(model.get_submodule(n), pool_a, pool_b, ia[i], ib[i], cfg.r, cfg.scaling,
                                     cfg.dropout, key, i)
        replace_modules(model, names, lambda name, mod: built[name])
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters(model):
            p.requires_grad_(True)
        # the spec as given (the switches keep p and l as typed; mos_config derives the effective values)
        given = from_spec(MosConfig, spec, "mos", strict=False)
        return {**spec, **to_spec(given, alpha=cfg.alpha, targets=names, seed=cfg.seed)}

    def detach(self, model):
        unwrap_modules(model, MosLinear)

    @staticmethod
    def _groups(model) -> dict[str, list[MosLinear]]:
        groups: dict[str, list[MosLinear]] = {}
        for m in wrapped_modules(model, MosLinear).values():
            groups.setdefault(m.group, []).append(m)
        return {k: sorted(v, key=lambda m: m.layer) for k, v in sorted(groups.items())}

    def state(self, model):
        out = {}
        for key, mods in self._groups(model).items():
            ka, kb, kia, kib = _pool_keys(key)
            n = mods[0].pool_A.shape[0]
            out[ka] = mods[0].pool_A.detach().to("cpu", torch.float32, copy=True).contiguous()
            out[kb] = mods[0].pool_B.detach().to("cpu", torch.float32, copy=True).contiguous()
            out[kia] = torch.stack([m.idx_A for m in mods]).cpu().to(_index_dtype(n)).contiguous()
            out[kib] = torch.stack([m.idx_B for m in mods]).cpu().to(_index_dtype(n)).contiguous()
        return out

    def trainable_parameters(self, model):
        ps = []
        for mods in self._groups(model).values():
            ps += [mods[0].pool_A, mods[0].pool_B]
        return ps

    def count_trainable(self, spec, tensors):
        return sum(t.numel() for k, t in tensors.items() if k.endswith((".pool_A", ".pool_B")))

    def summary(self, spec, tensors):
        cfg = mos_config(spec)
        return {"equivalent_lora_rank": cfg.e, "mos_rank": cfg.r, "private_rank": cfg.p, "shards_per_vector": cfg.l,
                "strategies": {s: getattr(cfg, s) for s in STRATEGIES},
                "num_modules": len(spec.get("targets") or []),
                "num_pools": sum(1 for k in tensors if k.endswith(".pool_A")),
                # what the same modules would train as an ordinary LoRA at rank r
                "materialized_lora_params": sum(cfg.r * t.shape[1] * cfg.l * tensors[k[:-6] + "idx_A"].shape[0]
                                                for k, t in tensors.items() if k.endswith((".pool_A", ".pool_B"))
                                                and k[:-6] + "idx_A" in tensors)}

    def materialize(self, patch: Patch) -> Patch:
        """An ordinary LoRA patch (rank r, scaling alpha/r) whose modules compute exactly this MoS patch."""
        cfg = mos_config(patch.spec)
        groups = group_modules(list(patch.spec.get("targets") or []))
        tensors = {}
        for key, members in groups.items():
            ka, kb, kia, kib = _pool_keys(key)
            if any(k not in patch.tensors for k in (ka, kb, kia, kib)):
                raise PatchFormatError(f"MoS patch is missing the tensors of {key}")
            pa, pb = patch.tensors[ka].float(), patch.tensors[kb].float()
            ia, ib = patch.tensors[kia].long(), patch.tensors[kib].long()
            if ia.shape[0] != len(members):
                raise PatchFormatError(f"MoS indices of {key} cover {ia.shape[0]} layers, spec lists {len(members)}")
            for i, n in enumerate(members):
                tensors[f"{n}.lora_A"] = pa.index_select(0, ia[i]).reshape(cfg.r, -1).contiguous()
                tensors[f"{n}.lora_B"] = pb.index_select(0, ib[i]).reshape(cfg.r, -1).t().contiguous()
        spec = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "scaling": cfg.scaling,
                "targets": sorted({k.rsplit(".", 1)[0] for k in tensors})}
        return Patch(kind="lora", base=dict(patch.base), spec=spec, tensors=tensors,
                     provenance=provenance(materialized_from="mos", source=str(patch.path) if patch.path else None,
                                           mos_spec=dict(patch.spec)),
                     metrics=dict(patch.metrics))
