"""The routed model: every adapted linear module holds all experts' LoRA factors and a gate vector per expert.

y = W x + sum_{e in top-k} w_e s_e B_e A_e x. The weights come either fixed per sequence (the global router, the
oracle, uniform averaging, one expert) or from the local gates: logits = LayerNorm(x) . g_e / sqrt(d), plus the
global bias per sequence (GLIDER), top-k per token or per sequence (token logits averaged over the sequence's
real tokens), softmax over the chosen k. Two dispatches compute the same sum: `split` gathers the flattened
tokens of each expert and runs that expert on them alone (an expert no token chose does no work), `dense` runs
every expert's A on every token as one stacked matrix [sum r_e, d_in], weights each rank column by its expert's
routing weight (zero for an expert not chosen) and sums through one stacked B [d_out, sum r_e]: two matmuls instead
of a gather, a scatter and 2E small matmuls per module. `auto` takes dense when the stacked factors cost at most
what the base matmul costs (sum r_e x (d_in + d_out) <= d_in x d_out): the work wasted on unchosen experts is
then bounded by the base's and far below the split's per-expert Python loop on a CPU. `RouteState.calls` counts
the rows routed to each expert (weight > 0) under either dispatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from patchlm.adapters.inject import replace_modules, unwrap_modules, wrapped_modules
from patchlm.adapters.lora import lora_modules_from_tensors, module_scaling
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.route.config import DISPATCHES


@dataclass
class RouteState:
    """What every routed module of one model reads at its next forward pass (set per batch by the caller)."""

    num_experts: int
    top_k: int = 2
    level: str = "token"
    dispatch: str = "auto"                # auto | split | dense (see the module docstring)
    enabled: bool = True
    weights: torch.Tensor | None = None   # [B, E] fixed per-sequence weights (rows sum to 1 or 0)
    bias: torch.Tensor | None = None      # [B, E] added to the local gate logits (GLIDER's global part)
    mask: torch.Tensor | None = None      # [B, T] attention mask of the batch (captured by a pre-hook)
    train_expert: int | None = None       # Phatgoose gate training: expert e alone, scaled by sigmoid(x . g_e)
    calls: list[int] = field(default_factory=list)  # rows (tokens) each expert ran on, summed over modules
    mass: torch.Tensor | None = None      # [B, E] routing weight per sequence summed over tokens and modules

    def __post_init__(self):
        self.calls = [0] * self.num_experts

    def reset_counts(self) -> None:
        self.calls = [0] * self.num_experts
        self.mass = None


def topk_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Dense weights [.., E]: softmax over the k largest logits (renormalised top-k), zeros elsewhere."""
    k = min(k, logits.shape[-1])
    val, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(val, dim=-1))


class RoutedLinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts (None where an expert does not adapt this module) and E gates."""

    def __init__(self, base: nn.Linear, experts: list[tuple[torch.Tensor, torch.Tensor, float] | None],
                 state: RouteState):
        super().__init__()
        self.base = base
        self.state = state
        dev = base.weight.device
        self.scalings = [0.0 if e is None else float(e[2]) for e in experts]
        self.has = [e is not None for e in experts]
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(base.in_features, device=dev),
                                                    requires_grad=False) for _ in experts])
        # the experts' factors stacked once (the dense dispatch multiplies all of them at once; the split one and
        # expert() take expert i's slice [off_i, off_i + r_i)), each scaling folded into its columns of B
        present = [i for i, e in enumerate(experts) if e is not None]
        ranks = [0 if e is None else int(e[0].shape[0]) for e in experts]
        self.offsets = [sum(ranks[:i]) for i in range(len(experts) + 1)]
        if present:
            self.register_buffer("A_all", torch.cat([experts[i][0].to(dev, torch.float32) for i in present])
                                 .contiguous(), persistent=False)
            self.register_buffer("B_all", torch.cat([experts[i][1].to(dev, torch.float32) * self.scalings[i]
                                                     for i in present], 1).contiguous(), persistent=False)
            self.register_buffer("col_expert", torch.cat([torch.full((ranks[i],), i) for i in present]).to(dev),
                                 persistent=False)
        self.dense_ok = sum(ranks) * (base.in_features + base.out_features) <= base.in_features * base.out_features

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert i's (A [r, in], B [out, r] with its scaling folded in): views into the stacked factors."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.A_all[lo:hi], self.B_all[:, lo:hi]

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(i)
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != a.dtype:
            x = x.to(a.dtype)
        return F.linear(F.linear(x, a), b)

    def gate_matrix(self) -> torch.Tensor:
        return torch.stack([g for g in self.gates])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        st = self.state
        if not st.enabled:
            return y
        d = x.shape[-1]
        xf = x.reshape(-1, d)
        n = xf.shape[0]
        bsz = x.shape[0] if x.dim() > 1 else 1
        t = n // bsz
        if st.train_expert is not None:
            e = st.train_expert
            if not self.has[e]:
                return y
            g = torch.sigmoid(xf.float() @ self.gates[e].float())
            out = self.expert(e, xf).float() * g[:, None]
            return y + out.to(y.dtype).view(*y.shape)
        if st.weights is not None:
            w = st.weights.to(x.device, torch.float32).repeat_interleave(t, 0)
        else:
            logits = F.layer_norm(xf.float(), (d,)) @ self.gate_matrix().float().T * math.sqrt(1.0 / d)
            if st.bias is not None:
                logits = logits + st.bias.to(x.device, torch.float32).repeat_interleave(t, 0)
            if st.level == "sequence":
                m = self._mask(bsz, t, x.device)
                pooled = (logits.view(bsz, t, -1) * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                w = topk_weights(pooled, st.top_k).repeat_interleave(t, 0)
            else:
                w = topk_weights(logits, st.top_k)
        self._tally(w, bsz, t, x.device)
        if not any(self.has):
            return y
        if st.dispatch == "dense" or (st.dispatch == "auto" and self.dense_ok):
            routed = (w > 0).sum(0).tolist()
            for e in range(len(self.has)):
                if self.has[e]:
                    st.calls[e] += int(routed[e])
            a, b = self.A_all, self.B_all
            xa = xf if torch.is_autocast_enabled(x.device.type) or xf.dtype == a.dtype else xf.to(a.dtype)
            h = F.linear(xa, a) * w[:, self.col_expert]
            return y + F.linear(h, b).to(y.dtype).view(*y.shape)
        out = torch.zeros(n, y.shape[-1], device=x.device, dtype=torch.float32)
        for e in range(len(self.has)):
            rows = (w[:, e] > 0).nonzero().squeeze(1)
            if rows.numel() == 0 or not self.has[e]:
                continue
            st.calls[e] += int(rows.numel())
            out[rows] += self.expert(e, xf[rows]).float() * w[rows, e:e + 1]  # rows are unique per expert
        return y + out.to(y.dtype).view(*y.shape)

    def _mask(self, bsz: int, t: int, device) -> torch.Tensor:
        m = self.state.mask
        if m is None or m.shape[0] != bsz:
            return torch.ones(bsz, t, device=device)
        return m[:, -t:].to(device, torch.float32)  # while decoding the mask covers the cache too

    def _tally(self, w: torch.Tensor, bsz: int, t: int, device) -> None:
        st = self.state
        m = self._mask(bsz, t, device)
        mass = (w.view(bsz, t, -1) * m[..., None]).sum(1).detach().cpu()
        st.mass = mass if st.mass is None or st.mass.shape != mass.shape else st.mass + mass


def expert_factors(patches) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float] | None]]:
    """module name -> per-expert (A, B, scaling) or None, over the union of the experts' modules."""
    mods = [lora_modules_from_tensors(p.tensors) for p in patches]
    names = sorted(set().union(*mods)) if mods else []
    out = {}
    for n in names:
        row = []
        for p, m in zip(patches, mods):
            if n in m:
                a, b = m[n]
                row.append((a, b, module_scaling(p.spec, a.shape[0])))
            else:
                row.append(None)
        out[n] = row
    return out


def _capture_mask(state: RouteState):
    def hook(module, args, kwargs):
        state.mask = kwargs.get("attention_mask")
        return None

    return hook


def install(model: nn.Module, patches, top_k: int = 2, level: str = "token", dispatch: str = "auto") -> RouteState:
    """Replace every module any expert adapts by a RoutedLinear over all experts; freeze the model."""
    if dispatch not in DISPATCHES:
        raise ConfigError(f"unknown dispatch {dispatch!r}; choices: {', '.join(DISPATCHES)}", field="dispatch")
    if not patches:
        raise ConfigError("a routed model needs at least one expert", field="library")
    if top_k > len(patches):
        raise ConfigError(f"top_k {top_k} is larger than the library's {len(patches)} experts", field="top_k")
    remove(model)
    state = RouteState(num_experts=len(patches), top_k=top_k, level=level, dispatch=dispatch)
    factors = expert_factors(patches)
    for n in factors:
        try:
            mod = model.get_submodule(n)
        except AttributeError as e:
            raise PatchFormatError(f"an expert adapts module {n}, which this model does not have") from e
        if not isinstance(mod, nn.Linear):
            raise PatchFormatError(f"an expert adapts module {n}, a {type(mod).__name__}, not a Linear")
    replace_modules(model, list(factors), lambda name, mod: RoutedLinear(mod, factors[name], state))
    for p in model.parameters():
        p.requires_grad_(False)
    model._patchlm_route_hook = model.register_forward_pre_hook(_capture_mask(state), with_kwargs=True)
    model._patchlm_route_state = state
    return state


def remove(model: nn.Module) -> None:
    """Put back the plain linear modules (a no-op on a model without routed modules)."""
    unwrap_modules(model, RoutedLinear)
    hook = getattr(model, "_patchlm_route_hook", None)
    if hook is not None:
        hook.remove()
        del model._patchlm_route_hook
        del model._patchlm_route_state


def routed_modules(model: nn.Module) -> dict[str, RoutedLinear]:
    return wrapped_modules(model, RoutedLinear)
