"""The `merged` patch kind: dense per-module weight deltas, and their LoRA form by truncated SVD.

A merged patch holds `<module>.delta` (float32) for every Linear it changes; attaching adds the delta to the
weight in place (the original is kept for detach). `refactor` turns one into a LoRA (exact at full rank, with the
relative error reported when truncated), which is also the kind's `materialize`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from patchlm.adapters.inject import replace_modules, unwrap_modules, wrapped_modules
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import Patch, PatchKind, provenance, register_kind

SUFFIX = ".delta"


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


@register_kind("merged", stage="weight", capabilities=("materialize", "export-peft", "export-merged"))
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
        return dict(spec)

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
    """module name -> dense delta of a merged patch's tensors (refusing a tensor not named <module>.delta)."""
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
