"""Merging patches exactly through their dense updates, and the `merged` patch kind.

Every LoRA module's update is dW = scaling * B @ A (MoS and any kind with `materialize` go through their
LoRA form first). Merge methods run on these dW per module, never on A and B separately (which would add
cross terms). The result is a `merged` patch (dense deltas per module), optionally re-factorized to a
rank-r LoRA by truncated SVD with its relative error reported; linear / task-arithmetic merges of LoRA
patches are exact as one stacked LoRA of rank sum(r_k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from patchlm.adapters.inject import replace_modules, unwrap_modules, wrapped_modules
from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError
from patchlm.merge.methods import MergeMethod, get_method, merge_tensor, validate_value
from patchlm.patch import Patch, PatchKind, provenance, register_kind

SUFFIX = ".delta"


# ---------------------------------------------------------------- the merged kind
class DeltaLinear(nn.Module):
    """A Linear whose weight carries a dense delta, merged in place; the original is kept for detach."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor):
        super().__init__()
        if tuple(delta.shape) != tuple(base.weight.shape):
            raise PatchFormatError(f"delta of shape {list(delta.shape)} does not fit a Linear of weight shape "
                                   f"{list(base.weight.shape)}")
        self.base = base
        self.register_buffer("delta", delta.detach().float().clone(), persistent=False)
        with torch.no_grad():
            self._original = base.weight.detach().clone()
            base.weight.add_(self.delta.to(base.weight.dtype))

    def forward(self, x):
        return self.base(x)

    @torch.no_grad()
    def restore(self) -> None:
        self.base.weight.copy_(self._original)


@register_kind("merged")
class MergedKind(PatchKind):
    """Dense per-module deltas: tensors `<module>.delta` (float32). spec: method, params, sources."""

    def attach(self, model, spec, tensors=None, seed=0):
        if tensors is None:
            raise PatchFormatError("a merged patch is made by `patchlm merge`, not trained: it needs its tensors")
        deltas = module_deltas_from_merged(tensors)
        missing = [n for n in deltas if not _has(model, n)]
        if missing:
            raise PatchFormatError(f"merged patch targets modules this model does not have: {', '.join(missing[:3])}")

        def make(name, mod):
            if not isinstance(mod, nn.Linear):
                raise PatchFormatError(f"module {name} is a {type(mod).__name__}, not a Linear")
            return DeltaLinear(mod, deltas[name])

        replace_modules(model, list(deltas), make)

    def detach(self, model):
        for m in wrapped_modules(model, DeltaLinear).values():
            m.restore()
        unwrap_modules(model, DeltaLinear)

    def state(self, model):
        return {f"{n}{SUFFIX}": m.delta.detach().float().cpu().contiguous()
                for n, m in wrapped_modules(model, DeltaLinear).items()}

    def summary(self, spec, tensors):
        return {"num_modules": len(tensors), "method": spec.get("method"), "sources": spec.get("sources")}

    def materialize(self, patch: Patch) -> Patch:
        """The LoRA form: exact (full rank) unless spec['rank'] asks for a truncation."""
        rank = patch.spec.get("rank")
        lora, _ = refactor(patch, rank=rank)
        return lora


def module_deltas_from_merged(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if not k.endswith(SUFFIX):
            raise PatchFormatError(f"merged patch tensor {k!r} should be named <module>{SUFFIX}")
        out[k[: -len(SUFFIX)]] = v
    return out


def _has(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------- deltas of a patch
class PatchDeltas:
    """module name -> dW of one patch, computed when asked (scaling * B @ A for LoRA, stored for merged)."""

    def __init__(self, patch: Patch):
        from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
        from patchlm.adapters.peft_io import to_lora_patch

        self.source = patch
        if patch.kind == "merged":
            self._dense = module_deltas_from_merged(patch.tensors)
            self._lora = None
        else:
            lp = to_lora_patch(patch)
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
                                    f"({ref.get('fingerprint')}) and {p.base.get('name')} ({p.base.get('fingerprint')});"
                                    " port one first (patchlm port) or pass --force")
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
            merged = m.fn(w + ds[0], w + ds[1], **_kw(shared))
            out[name + SUFFIX] = (merged - w).contiguous()
        elif m.name == "fisher":
            fs = [f.get(name, torch.ones(shape)) for f in fishers]
            kw = _kw(shared)
            out[name + SUFFIX] = m.fn(ds, weight=[mp.get("weight", 1.0) for mp in mps], fisher=fs, **kw).contiguous()
        else:
            out[name + SUFFIX] = merge_tensor(m, name, None, ds, mps, shared, seed=seed).contiguous()
    merged = Patch(kind="merged", base=base_ref, spec=spec, tensors=out,
                   provenance=provenance(merged_from=sources, method=m.name))
    if rank is not None:
        lora, report = refactor(merged, rank)
        lora.metrics.update(report)
        return lora
    return merged


def _kw(shared: dict) -> dict:
    return {("lam" if k == "lambda" else k): v for k, v in shared.items()}


def _stack(patches, m, mps, shared, base_ref, spec) -> Patch:
    """sum_k c_k s_k B_k A_k as one LoRA: A = [A_1; ...], B = [c_1 s_1 B_1, ...] (scaling 1). Exact."""
    from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
    from patchlm.adapters.peft_io import to_lora_patch

    ws = [float(mp.get("weight", 1.0)) for mp in mps]
    total = sum(ws)
    if m.name == "linear":
        if shared.get("normalize", True) and abs(total) < 1e-8:
            raise ConfigError("linear merge with normalize: the weights sum to zero")
        coef = [w / total for w in ws] if shared.get("normalize", True) else ws
    else:
        lam = float(shared.get("lambda", 1.0))
        div = total if shared.get("normalize") and abs(total) >= 1e-8 else 1.0
        coef = [w * lam / div for w in ws]
    loras = [to_lora_patch(p) for p in patches]
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


def refactor(patch: Patch, rank: int | None = None) -> tuple[Patch, dict]:
    """A merged patch as a LoRA of rank `rank` (None: exact full rank) by truncated SVD, with its error.

    dW = U S V^T ~ (U_r S_r^1/2)(S_r^1/2 V_r^T) = B A, scaling 1. The report gives the relative Frobenius error
    over all modules, sqrt(sum ||dW - BA||^2 / sum ||dW||^2), and the worst module's.
    """
    if patch.kind != "merged":
        raise ConfigError(f"refactor takes a merged patch, not {patch.kind}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    tensors, err2, tot2, worst = {}, 0.0, 0.0, (0.0, None)
    for name, d in module_deltas_from_merged(patch.tensors).items():
        d = d.float()
        r = min(d.shape) if rank is None else min(rank, *d.shape)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        sq = S[:r].sqrt()
        B = (U[:, :r] * sq).contiguous()
        A = (sq[:, None] * Vh[:r]).contiguous()
        e2 = float(((d - B @ A) ** 2).sum())
        n2 = float((d ** 2).sum())
        err2 += e2
        tot2 += n2
        rel = math.sqrt(e2 / n2) if n2 > 0 else 0.0
        if rel >= worst[0]:
            worst = (rel, name)
        tensors[f"{name}.lora_A"] = A
        tensors[f"{name}.lora_B"] = B
    rel_err = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
    report = {"refactor_rank": rank or "full", "refactor_rel_error": rel_err, "refactor_worst_module": worst[1],
              "refactor_worst_rel_error": worst[0]}
    spec = {"r": rank or max((t.shape[0] for k, t in tensors.items() if k.endswith("lora_A")), default=0),
            "alpha": 1.0, "scaling": 1.0, "dropout": 0.0, "targets": sorted({k.rsplit(".", 1)[0] for k in tensors}),
            "merge": patch.spec}
    lora = Patch(kind="lora", base=dict(patch.base), spec=spec, tensors=tensors,
                 provenance=provenance(refactored_from=str(patch.path) if patch.path else None), metrics=dict(report))
    return lora, report


def merge_patch_plan(plan, rank: int | None = None, stack: bool = True, fisher_examples: int = 32,
                     force: bool = False, bf16: bool = False, log=None) -> Patch:
    """Run a MergePlan whose models are patch directories (what `patchlm merge --patch ...` does)."""
    log = log or (lambda m: None)
    plan.validate()
    if not plan.patches:
        raise ConfigError("this plan merges checkpoints, not patches")
    for where, d in [("parameters", plan.parameters)] + [(e.model, e.parameters) for e in plan.models]:
        for k, v in d.items():
            if isinstance(v, (list, dict)):
                raise ConfigError(f"parameter {k} of {where}: per-layer gradients and filters are supported for "
                                  "checkpoint merges only; give one value for patches")
    patches = [Patch.load(e.model) for e in plan.models]
    m = plan.method
    base_weights = fishers = None
    if m.space == "pair" or m.name == "fisher":
        from patchlm.models import load_base

        check_same_base(patches, force=force)
        base = load_base(patches[0].base["name"])
        if m.space == "pair":
            pd = [PatchDeltas(p) for p in patches]
            mods = sorted({x for d in pd for x in d.modules})
            base_weights = {n: base.model.get_submodule(n).weight.detach().float().clone() for n in mods}
        else:
            from patchlm.data import load_task
            from patchlm.merge.fisher import estimate_fisher

            fishers = []
            for e, p in zip(plan.models, patches):
                f = e.parameters.get("fisher", plan.parameters.get("fisher"))
                if isinstance(f, str) and f.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    fishers.append(load_file(f))
                    continue
                task_name = f if isinstance(f, str) else p.provenance.get("task")
                if not task_name:
                    raise ConfigError(f"patch {e.model} records no task: give its Fisher data with "
                                      "parameters: {fisher: TASK} (or a .safetensors file)")
                log(f"Fisher of {e.model} on {task_name}")
                fishers.append(estimate_fisher(base, p, load_task(task_name), n_examples=fisher_examples, bf16=bf16))
    mps = [{k: v for k, v in e.parameters.items() if k != "fisher"} for e in plan.models]
    shared = {k: v for k, v in plan.parameters.items() if k != "fisher"}
    for mp in mps:
        for k in list(shared):
            if k in m.model_params:
                mp.setdefault(k, shared[k])
    shared = {k: v for k, v in shared.items() if k not in m.model_params}
    return merge_patches(patches, m, params=shared, model_params=mps, seed=plan.seed, base_weights=base_weights,
                         fishers=fishers, rank=rank, stack=stack, force=force, names=[e.model for e in plan.models])
