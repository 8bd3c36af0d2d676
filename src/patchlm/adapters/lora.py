"""LoRA: y = W x + (alpha/r) B A dropout(x); A r x d_in (Kaiming-uniform), B d_out x r (zeros).

Tensors are saved as `<module>.lora_A` and `<module>.lora_B`. The rank of each module is read from its
tensors, so patches with per-module ranks (e.g. FLoRA's stacked adapters) load too; `spec["scaling"]`,
when present, overrides alpha/r. The spec maps onto `LoraConfig`; alpha unset means 2 x r, in the library and
the CLI alike (every benchmark figure was measured with scaling 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from patchlm.adapters.config import check_dropout, check_positive_int, from_spec, to_spec
from patchlm.adapters.inject import has_module, replace_modules, resolve_targets, unwrap_modules, wrapped_modules
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import PatchKind, register_kind
from patchlm.typed import check_fields

TARGETS_HELP = "modules: names (q_proj,v_proj), full names, re:<regex>, or a preset: attn, mlp, qv, all-linear"


@dataclass
class LoraConfig:
    """LoRA hyper-parameters: a LoRA patch's spec, the `patchlm train --method lora` options, a recipe's spec."""

    r: int = field(default=8, metadata={"help": "LoRA rank", "short": "-r"})
    alpha: float | None = field(default=None, metadata={"help": "scaling = alpha / rank; unset: 2 x rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: str | list[str] = field(default="all-linear", metadata={"help": TARGETS_HELP})
    scaling: float | None = field(default=None, metadata={
        "cli": False, "help": "overrides alpha / r (imported, federated and merged patches)"})

    def __post_init__(self):
        check_fields(self)
        check_positive_int(self.r, "r", "LoRA rank")
        check_dropout(self.dropout, "LoRA")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}", field="alpha")

    @property
    def lora_alpha(self) -> float:
        """alpha as used: the given value, else 2 x r."""
        return default_alpha(self.r) if self.alpha is None else float(self.alpha)


def default_alpha(r: int) -> float:
    """The one alpha default of LoRA-style adapters (LoRA, MoS): 2 x the rank."""
    return float(2 * int(r))


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}", field="r")
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha = r, alpha
        self.scaling = float(scaling) if scaling is not None else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self._original: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        a = self.lora_A
        xd = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type) and xd.dtype != a.dtype:
            xd = xd.to(a.dtype)
        upd = F.linear(F.linear(xd, a), self.lora_B) * self.scaling
        return y + upd.to(y.dtype)

    def delta(self) -> torch.Tensor:
        """dW = scaling * B A, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add dW into the base weight, keeping the original so unmerge restores it exactly."""
        if self.merged:
            return
        self._original = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._original)
        self._original = None
        self.merged = False


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = scaling * B A for saved tensors."""
    return (B.float() @ A.float()) * scaling


def merge_lora(model: nn.Module) -> None:
    for m in wrapped_modules(model, LoraLinear).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in wrapped_modules(model, LoraLinear).values():
        m.unmerge()


def bake_lora(model: nn.Module) -> None:
    """Merge every LoRA module into its base weight for good and remove the wrappers (for export)."""
    for m in wrapped_modules(model, LoraLinear).values():
        m.merge()
        m._original = None
    unwrap_modules(model, LoraLinear)


def lora_modules_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) from a LoRA patch's tensors, checking each has both halves."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    out = {}
    for n in sorted(names):
        a, b = tensors.get(f"{n}.lora_A"), tensors.get(f"{n}.lora_B")
        if a is None or b is None:
            raise PatchFormatError(f"LoRA patch has an incomplete module {n}: need {n}.lora_A and {n}.lora_B")
        if a.shape[0] != b.shape[1]:
            raise PatchFormatError(f"LoRA module {n}: A has rank {a.shape[0]} but B has rank {b.shape[1]}")
        out[n] = (a, b)
    return out


def module_scaling(spec: dict, rank: int) -> float:
    """The scaling of a module of rank `rank` in a LoRA patch: spec scaling, else alpha / rank (alpha unset: 2r)."""
    if spec.get("scaling") is not None:
        return float(spec["scaling"])
    alpha = spec.get("alpha")
    return (default_alpha(spec.get("r", rank)) if alpha is None else float(alpha)) / rank


@register_kind("lora", stage="weight", capabilities=("export-peft", "export-merged"))
class LoraKind(PatchKind):
    """spec: LoraConfig's fields (targets resolved to full module names) and the init seed."""

    def attach(self, model, spec, tensors=None, seed=0):
        cfg = from_spec(LoraConfig, spec, "lora", strict=tensors is None)
        if tensors is not None:
            mods = lora_modules_from_tensors(tensors)
            names = list(mods)
        else:
            names = resolve_targets(model, cfg.targets)
        missing = [n for n in names if not has_module(model, n)]
        if missing:
            raise PatchFormatError(f"LoRA patch targets modules this model does not have: {', '.join(missing[:3])}")
        gen = torch.Generator().manual_seed(int(seed))
        dropout = float(cfg.dropout)
        alpha = cfg.lora_alpha

        def make(name, mod):
            if not isinstance(mod, nn.Linear):
                raise PatchFormatError(f"module {name} is a {type(mod).__name__}, not a Linear: cannot attach LoRA")
            if tensors is not None:
                a, b = mods[name]
                if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
                    raise PatchFormatError(
                        f"LoRA module {name} has shape {tuple(b.shape[:1])}x{tuple(a.shape[1:])} but the model's is "
                        f"{mod.out_features}x{mod.in_features}: patch made for another architecture")
                r = a.shape[0]
                m = LoraLinear(mod, r, alpha, dropout, module_scaling(spec, r))
                with torch.no_grad():
                    m.lora_A.copy_(a)
                    m.lora_B.copy_(b)
            else:
                r = int(cfg.r)
                m = LoraLinear(mod, r, alpha, dropout, cfg.scaling)
                with torch.no_grad():  # seeded Kaiming-uniform, same bound as nn.init.kaiming_uniform_(a=sqrt(5))
                    bound = 1.0 / math.sqrt(mod.in_features)
                    m.lora_A.copy_((torch.rand(m.lora_A.shape, generator=gen) * 2 - 1) * bound)
            return m

        replace_modules(model, names, make)
        for p in model.parameters():
            p.requires_grad_(False)
        for m in wrapped_modules(model, LoraLinear).values():
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        resolved = to_spec(cfg, alpha=alpha, targets=names)
        if cfg.scaling is None:
            del resolved["scaling"]
        return {**spec, **resolved}

    def detach(self, model):
        for m in wrapped_modules(model, LoraLinear).values():
            m.unmerge()
        unwrap_modules(model, LoraLinear)

    def state(self, model):
        out = {}
        for n, m in wrapped_modules(model, LoraLinear).items():
            out[f"{n}.lora_A"] = m.lora_A.detach().float().cpu().contiguous()
            out[f"{n}.lora_B"] = m.lora_B.detach().float().cpu().contiguous()
        return out

    def trainable_parameters(self, model):
        ps = []
        for m in wrapped_modules(model, LoraLinear).values():
            ps += [m.lora_A, m.lora_B]
        return ps

    def summary(self, spec, tensors):
        ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")})
        return {"rank": ranks[0] if len(ranks) == 1 else ranks, "num_modules": len(tensors) // 2}

