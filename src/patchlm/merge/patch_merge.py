"""Merging patches exactly through their dense updates: patches in, one patch out (no I/O, no model).

Every LoRA module's update is dW = scaling * B @ A (MoS and any kind that can materialize go through their
LoRA form first). Merge methods run on these dW per module, never on A and B separately (which would add
cross terms). The result is a `merged` patch (dense deltas per module), optionally re-factorized to a
rank-r LoRA by truncated SVD with its relative error reported; linear / task-arithmetic merges of LoRA
patches are exact as one stacked LoRA of rank sum(r_k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError
from patchlm.merge.merged import SUFFIX, module_deltas_from_merged, refactor
from patchlm.merge.methods import MergeMethod, get_method, merge_tensor, validate_value
from patchlm.patch import Patch, get_kind, kind_can, provenance


def lora_form(patch: Patch) -> Patch:
    """The patch itself if it is LoRA, else the LoRA its kind materializes (refused for kinds that cannot)."""
    if patch.kind == "lora":
        return patch
    if not kind_can(patch.kind, "materialize"):
        raise PatchFormatError(f"a {patch.kind} patch cannot be merged: its kind has no LoRA form (materialize)")
    return get_kind(patch.kind).materialize(patch)


# ---------------------------------------------------------------- deltas of a patch
class PatchDeltas:
    """module name -> dW of one patch, computed when asked (scaling * B @ A for LoRA, stored for merged)."""

    def __init__(self, patch: Patch):
        self.source = patch
        if patch.kind == "merged":
            self._dense = module_deltas_from_merged(patch.tensors)
            self._lora = None
        else:
            lp = lora_form(patch)
            self._lora = {n: (a, b, module_scaling(lp.spec, a.shape[0]))
                          for n, (a, b) in lora_modules_from_tensors(lp.tensors).items()}
            self._dense = None
            self.lora_patch = lp

    @property
    def modules(self) -> list[str]:
        return list(self._dense if self._dense is not None else self._lora)

    def shape(self, name: str) -> tuple[int, int]:
        if self._dense is not None:
            return tuple(self._dense[name].shape)
        a, b, _ = self._lora[name]
        return (b.shape[0], a.shape[1])

    def get(self, name: str) -> torch.Tensor | None:
        if self._dense is not None:
            t = self._dense.get(name)
            return None if t is None else t.float()
        if name not in self._lora:
            return None
        a, b, s = self._lora[name]
        return (b.float() @ a.float()) * s


def patch_deltas(patch: Patch) -> dict[str, torch.Tensor]:
    """Every module's dense update dW of a patch (LoRA, MoS via materialize, or merged)."""
    pd = PatchDeltas(patch)
    return {n: pd.get(n) for n in pd.modules}


def check_same_base(patches: Sequence[Patch], force: bool = False) -> dict:
    """The common base of `patches`; refuses different architectures always, different weights unless force."""
    ref = patches[0].base
    for p in patches[1:]:
        if p.base.get("architecture") != ref.get("architecture"):
            raise BaseMismatchError(f"cannot merge patches for different architectures: {ref.get('architecture')} "
                                    f"({ref.get('name')}) and {p.base.get('architecture')} ({p.base.get('name')})")
        if not force and p.base.get("fingerprint") != ref.get("fingerprint"):
            raise BaseMismatchError(f"patches were made for different bases: {ref.get('name')} "
                                    f"({ref.get('fingerprint')}) and {p.base.get('name')} "
                                    f"({p.base.get('fingerprint')}); port one first (patchlm port) or pass --force")
    return dict(ref)


# ---------------------------------------------------------------- merging
def merge_patches(patches: Sequence[Patch], method: str | MergeMethod = "task_arithmetic",
                  weights: Sequence[float] | None = None, densities: Sequence[float] | None = None,
                  params: dict | None = None, model_params: Sequence[dict] | None = None, seed: int = 0,
                  base_weights: dict[str, torch.Tensor] | None = None, fishers: Sequence[dict] | None = None,
                  rank: int | None = None, stack: bool = True, force: bool = False,
                  names: Sequence[str] | None = None) -> Patch:
    """Merge patches of one base through their dW with any merge method.

    weights/densities (or model_params dicts) are per patch; params are the method's shared parameters.
    A module missing from a patch has dW = 0 there. slerp needs `base_weights` (module -> W) since it
    interpolates full weights; fisher needs `fishers` (per patch, module -> diagonal Fisher of W).
    Linear / task arithmetic over LoRA patches gives an exact stacked LoRA when `stack` (and no rank);
    otherwise a `merged` patch, re-factorized to a rank-`rank` LoRA when rank is given.
    """
    if not patches:
        raise ConfigError("no patches to merge")
    m = get_method(method) if isinstance(method, str) else method
    base_ref = check_same_base(patches, force=force)
    n = len(patches)
    mps = [dict(x) for x in model_params] if model_params is not None else [{} for _ in range(n)]
    if len(mps) != n:
        raise ConfigError(f"got {len(mps)} per-patch parameter sets for {n} patches")
    for key, vals in (("weight", weights), ("density", densities)):
        if vals is not None:
            if len(vals) != n:
                raise ConfigError(f"got {len(vals)} {key} values for {n} patches: give one per patch")
            for mp, v in zip(mps, vals):
                mp[key] = v
    shared = {}
    params = dict(params or {})
    for key, p in m.params.items():
        shared[key] = params.pop(key, p.default)
        validate_value(m, key, shared[key])
    for key in params:
        validate_value(m, key, None)  # unknown parameter -> error naming it
    for i, mp in enumerate(mps):
        for key, v in mp.items():
            if key not in m.model_params:
                validate_value(m, key, None, f" (patch {i})")
            validate_value(m, key, v, f" (patch {i})")
    for key, p in m.params.items():
        if p.required and shared.get(key) is None:
            raise ConfigError(f"merge method {m.name} needs parameter {key!r}")
    if m.space == "pair" and n != 2:
        raise ConfigError(f"slerp merges exactly two patches, got {n}")
    if m.space == "pair" and base_weights is None:
        raise ConfigError("slerp of patches interpolates full weights: pass the base weights (base_weights=...)")
    if m.name == "fisher" and (fishers is None or len(fishers) != n):
        raise ConfigError("fisher merging needs one diagonal Fisher per patch (see merge.fisher.estimate_fisher)")
    sources = [str(p.path) if p.path else (names[i] if names else f"patch{i}") for i, p in enumerate(patches)]
    spec = {"method": m.name, "params": shared, "model_params": mps, "seed": seed, "sources": sources}

    all_lora = all(p.kind != "merged" for p in patches)
    if stack and rank is None and all_lora and m.name in ("linear", "task_arithmetic"):
        return _stack(patches, m, mps, shared, base_ref, spec)

    pds = [PatchDeltas(p) for p in patches]
    modules: list[str] = []
    for pd in pds:
        modules += [x for x in pd.modules if x not in modules]
    out: dict[str, torch.Tensor] = {}
    for name in modules:
        shapes = {pd.shape(name) for pd in pds if name in pd.modules}
        if len(shapes) > 1:
            raise BaseMismatchError(f"module {name} has different shapes across patches: {sorted(shapes)}")
        shape = shapes.pop()
        ds = [pd.get(name) if name in pd.modules else torch.zeros(shape) for pd in pds]
        if m.space == "pair":
            w = base_weights[name].float()
            out[name + SUFFIX] = (merge_tensor(m, name, w + ds[0], [w + ds[1]], mps, shared) - w).contiguous()
        else:
            extra = {"fisher": [f.get(name, torch.ones(shape)) for f in fishers]} if m.name == "fisher" else None
            out[name + SUFFIX] = merge_tensor(m, name, None, ds, mps, shared, seed=seed,
                                              per_model_inputs=extra).contiguous()
    merged = Patch(kind="merged", base=base_ref, spec=spec, tensors=out,
                   provenance=provenance(merged_from=sources, method=m.name))
    if rank is not None:
        lora, report = refactor(merged, rank)
        lora.metrics.update(report)
        return lora
    return merged


def _stack(patches, m, mps, shared, base_ref, spec) -> Patch:
    """sum_k c_k s_k B_k A_k as one LoRA: A = [A_1; ...], B = [c_1 s_1 B_1, ...] (scaling 1). Exact."""
    ws = [float(mp.get("weight", m.model_params["weight"].default)) for mp in mps]
    total = sum(ws)
    if m.name == "linear":
        if shared["normalize"] and abs(total) < 1e-8:
            raise ConfigError("linear merge with normalize: the weights sum to zero", field="weight")
        coef = [w / total for w in ws] if shared["normalize"] else ws
    else:
        scale = float(shared["lambda"])
        div = total if shared["normalize"] and abs(total) >= 1e-8 else 1.0
        coef = [w * scale / div for w in ws]
    loras = [lora_form(p) for p in patches]
    mods = [lora_modules_from_tensors(lp.tensors) for lp in loras]
    names: list[str] = []
    for md in mods:
        names += [x for x in md if x not in names]
    tensors = {}
    for name in names:
        As, Bs = [], []
        for lp, md, c in zip(loras, mods, coef):
            if name in md and c != 0:
                a, b = md[name]
                As.append(a.float())
                Bs.append(b.float() * (c * module_scaling(lp.spec, a.shape[0])))
        if not As:
            continue
        tensors[f"{name}.lora_A"] = torch.cat(As, 0).contiguous()
        tensors[f"{name}.lora_B"] = torch.cat(Bs, 1).contiguous()
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")})
    lspec = {"r": ranks[-1] if ranks else 0, "alpha": 1.0, "scaling": 1.0, "dropout": 0.0,
             "targets": sorted({k.rsplit(".", 1)[0] for k in tensors}), "merge": {**spec, "exact": "stacked"}}
    return Patch(kind="lora", base=base_ref, spec=lspec, tensors=tensors,
                 provenance=provenance(merged_from=spec["sources"], method=m.name),
                 metrics={"refactor_rel_error": 0.0, "stacked_rank": ranks})
