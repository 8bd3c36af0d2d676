"""Merge methods as small pure functions on tensors, registered by decorator.

Each method merges ONE tensor. Delta methods get task vectors (tau_k = theta_k - theta_base, or a patch's dW)
and return the merged delta; weight-space methods (linear, slerp) get full weights, as mergekit's do.
`deltas` may be any sequence: a list, or a lazy view that reads model k from disk when indexed. Every
method touches `deltas[k]` one at a time (TIES/DARE-TIES read each twice: sign election, then the sum), so a
streamed merge holds a few tensors, not N models, and gives the same bits as the in-memory merge.

Semantics follow the papers with mergekit's parameterisation where both tools have a method
(mergekit 0.1.5): `weight`/`density` per model, `normalize`, `lambda`, `rescale` (L1-norm rescaling after
dropping, mergekit's default for DARE; `rescale: inverse` is the DARE paper's 1/density), `gamma`
(Breadcrumbs: the top fraction removed), `t` (SLERP from the base model, t=0, to the other model, t=1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean

# ---------------------------------------------------------------- registry
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default (None + required=True means it must be given), a check, help text."""

    default: Any = None
    required: bool = False
    check: Check | None = None
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    space: str  # "delta" (task vectors) | "weights" (full weights, like mergekit's linear) | "pair" (slerp)
    params: dict[str, Param] = field(default_factory=dict)  # shared by every model
    model_params: dict[str, Param] = field(default_factory=dict)  # per model ("tensor parameters" in mergekit)
    random: bool = False
    reference: str = ""
    description: str = ""
    mergekit: bool = True  # mergekit has a method of this name with the same semantics

    @property
    def needs_base(self) -> bool:
        return self.space in ("delta", "pair")

    def all_params(self) -> dict[str, Param]:
        return {**self.params, **self.model_params}


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, space: str = "delta", params: dict | None = None, model_params: dict | None = None,
                 random: bool = False, reference: str = "", mergekit: bool = True):
    """Decorator: register `fn` as merge method `name` (one function, one registration, one test)."""

    def deco(fn):
        METHODS[name] = MergeMethod(name, fn, space, dict(params or {}), dict(model_params or {}), random,
                                    reference, (fn.__doc__ or "").strip().splitlines()[0], mergekit)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise UnknownNameError(f"unknown merge method {name!r}; {did_you_mean(name, METHODS)}")
    return METHODS[name]


# ---------------------------------------------------------------- parameter checks
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_density(v) -> str | None:
    if not _num(v) or not 0 < v <= 1:
        return f"density must be in (0, 1], got {v!r}"
    return None


def check_unit(v) -> str | None:
    if not _num(v) or not 0 <= v <= 1:
        return f"must be in [0, 1], got {v!r}"
    return None


def check_real(v) -> str | None:
    return None if _num(v) else f"must be a finite number, got {v!r}"


def check_bool(v) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def check_rescale(v) -> str | None:
    return None if isinstance(v, bool) or v in ("l1", "inverse") else f"must be true, false, l1 or inverse, got {v!r}"


def check_positive(v) -> str | None:
    return None if _num(v) and v > 0 else f"must be positive, got {v!r}"


def validate_value(method: MergeMethod, key: str, value: Any, where: str = "") -> None:
    """Raise ConfigError when `value` is out of range for parameter `key` of `method`."""
    p = method.all_params().get(key)
    if p is None:
        raise ConfigError(f"merge method {method.name} has no parameter {key!r}{where}; "
                          f"its parameters: {', '.join(sorted(method.all_params())) or 'none'}")
    if p.check is not None and value is not None:
        msg = p.check(value)
        if msg:
            raise ConfigError(f"{method.name} parameter {key}{where}: {msg}")


# ---------------------------------------------------------------- seeding
def tensor_seed(seed: int, name: str, k: int) -> int:
    """A stable per-(run seed, tensor name, model index) seed: streamed and in-memory DARE drop the same entries."""
    h = hashlib.blake2b(f"{seed}|{name}|{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------- sparsification (per task vector)
# A pruner returns the mask of entries kept (None: keep everything); `apply_mask` zeroes the rest and
# rescales. Masks are small (one byte an entry), so TIES-style methods keep them between their two passes
# instead of sorting every task vector twice.
def _rescale(orig: torch.Tensor, masked: torch.Tensor, mode, density: float) -> torch.Tensor:
    """mergekit's rescale (L1 norm of the kept entries matched to the original), or DARE's 1/density."""
    if mode is False or mode is None:
        return masked
    if mode == "inverse":
        return masked / density
    before, after = orig.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def apply_mask(delta: torch.Tensor, mask: torch.Tensor | None, rescale=False, density: float = 1.0) -> torch.Tensor:
    if mask is None:
        return delta
    out = torch.where(mask.reshape(delta.shape), delta, torch.zeros((), dtype=delta.dtype))
    return _rescale(delta, out, rescale, density)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """The top `density` fraction of entries by magnitude (at least one)."""
    n = delta.numel()
    if density >= 1 or n == 0 or not bool(delta.any()):  # an all-zero vector prunes to itself: no sort
        return None
    k = max(1, int(density * n))
    a = delta.reshape(-1).abs().float()
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    # the k-th largest magnitude by selection (linear time); when no run of equal magnitudes straddles the
    # cut, the entries at or above it are exactly the top k, whatever order a sort would give equal values
    thr = torch.kthvalue(a, n - k + 1).values
    mask = a >= thr
    if int(mask.sum()) == k:
        return mask
    # equal magnitudes straddle the cut: break the tie as mergekit does (its full descending sort), so
    # that the outputs agree bit for bit
    del mask
    idx = torch.argsort(a, descending=True)[:k]
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[idx] = True
    return mask


def random_mask(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor | None:
    """DARE: keep each entry with probability density (seeded)."""
    if density >= 1:
        return None
    return (torch.rand(delta.shape, generator=gen, dtype=torch.float32) < density).reshape(-1)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Model Breadcrumbs: drop the `gamma` fraction of largest-magnitude entries and the smallest, keeping `density`.

    As in mergekit: n_keep = int(density*n), n_top = int(gamma*n), the smallest n - n_keep - n_top (>= 0) are
    dropped and the next n_keep by magnitude kept (so the outlier cut shrinks when it would undershoot density).
    In the paper's terms, beta (top removed) = gamma and its bottom fraction = 1 - density - gamma.
    """
    n = delta.numel()
    if density >= 1 or n == 0 or not bool(delta.any()):
        return None
    keep_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep_n - n_top)
    a = delta.reshape(-1).abs().float()
    if keep_n == 0:
        return torch.zeros(n, dtype=torch.bool, device=delta.device)
    lo = torch.kthvalue(a, n_bot + 1).values  # the smallest kept and the largest kept, by selection
    hi = torch.kthvalue(a, n_bot + keep_n).values
    if int((a < lo).sum()) == n_bot and int((a <= hi).sum()) == n_bot + keep_n:
        return (a >= lo) & (a <= hi)  # unique: no run of equal magnitudes crosses either cut
    order = torch.sort(a, descending=False).indices  # ties at a cut: mergekit's order
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot: n_bot + keep_n]] = True
    return mask


def magnitude_prune(delta: torch.Tensor, density: float, rescale=False) -> torch.Tensor:
    """TIES trim: keep the top `density` fraction by magnitude, zero the rest."""
    return apply_mask(delta, magnitude_mask(delta, density), rescale, density)


def random_drop(delta: torch.Tensor, density: float, gen: torch.Generator, rescale=True) -> torch.Tensor:
    """DARE: drop each entry with probability 1-density (seeded), then rescale what is kept."""
    return apply_mask(delta, random_mask(delta, density, gen), rescale, density)


def outlier_prune(delta: torch.Tensor, density: float, gamma: float, rescale=False) -> torch.Tensor:
    """Model Breadcrumbs' pruning (see outlier_mask)."""
    return apply_mask(delta, outlier_mask(delta, density, gamma), rescale, density)


# ---------------------------------------------------------------- generalized task arithmetic
_POOL = None


def _in_order(load: Callable, n: int, with_mask: bool):
    """(k, load(k)) for k = 0..n-1 in order, two at a time on two threads when masks are computed (sorting a
    task vector is single-threaded in torch); at most two task vectors are held at once. Results are the
    same as a plain loop: masks do not depend on the order, and the caller accumulates in order."""
    global _POOL
    workers = min(2, torch.get_num_threads())
    if not with_mask or workers < 2 or n < 2:
        for k in range(n):
            yield k, load(k, with_mask)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="patchlm-merge")
    for start in range(0, n, 2):
        futs = [(k, _POOL.submit(load, k, with_mask)) for k in range(start, min(n, start + 2))]
        for k, f in futs:
            yield k, f.result()
        del futs


def combine_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                   mask_fn: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
                   densities: Sequence[float] | None = None, rescale=False, consensus: bool = False,
                   normalize: bool = False, lam: float = 1.0) -> torch.Tensor:
    """sum_k w_k prune(tau_k) [only entries agreeing with the elected sign] [/ sum of weights] * lambda.

    prune(tau_k) = the entries mask_fn keeps (rescaled as `rescale` says). The elected sign per entry is the
    sign of sum_k w_k prune(tau_k) (ties to +), TIES' "sum" election; with normalize the divisor counts only
    the weights of the models that contribute to the entry. Each tau_k is read once per pass.
    """
    n = len(deltas)
    if n == 0:
        raise ConfigError("nothing to merge: no models besides the base")
    dens = list(densities) if densities is not None else [1.0] * n
    masks: list = [None] * n

    def term(k: int, d: torch.Tensor, mask) -> torch.Tensor:
        return apply_mask(d, mask, rescale, dens[k]) * float(weights[k])

    def load(k: int, with_mask: bool):
        d = deltas[k].float()
        return d, (mask_fn(k, d) if (with_mask and mask_fn is not None) else None)

    pos = None
    if consensus:
        total = None
        for k, (d, m) in _in_order(load, n, True):
            masks[k] = m
            s = term(k, d, m)
            del d, m
            total = s if total is None else total.add_(s)
            del s
        pos = total >= 0
        del total
    mixed = None
    divisor: torch.Tensor | float = 0.0
    for k, (d, m) in _in_order(load, n, not consensus):
        mask = masks[k] if consensus else m
        s = term(k, d, mask)
        del d, m, mask
        masks[k] = None
        if consensus:
            agree = torch.where(pos, s > 0, s < 0)  # sign(s) == elected sign; zeros never agree
            s = torch.where(agree, s, torch.zeros(()))
            if normalize:
                wk = agree.float().mul_(float(weights[k]))
                divisor = wk if isinstance(divisor, float) else divisor.add_(wk)
                del wk
            del agree
        else:
            divisor = divisor + float(weights[k])
        mixed = s if mixed is None else mixed.add_(s)
        del s
    if normalize:
        if consensus:
            divisor = torch.where(divisor == 0, torch.ones(()), divisor)
        elif abs(divisor) < 1e-8:
            divisor = 1.0
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed


_W = Param(1.0, check=check_real, help="coefficient of this model's task vector")
_D = Param(1.0, check=check_density, help="fraction of the task vector's entries kept")
_LAM = Param(1.0, check=check_real, help="scale of the merged task vector")
_INT8 = Param(False, check=check_bool, help="mergekit's int8 mask (memory only: results are the same here)")


@merge_method("linear", space="weights", params={"normalize": Param(True, check=check_bool, help="divide by the sum of weights")},
              model_params={"weight": _W}, reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: Sequence[torch.Tensor], weight: Sequence[float], normalize: bool = True, **_) -> torch.Tensor:
    """Linear average (model soup): sum_k w_k theta_k, divided by sum_k w_k when normalize."""
    out = None
    for k in range(len(tensors)):
        t = tensors[k].float() * float(weight[k])
        out = t if out is None else out + t
    if normalize:
        s = float(sum(weight))
        if abs(s) < 1e-8:
            raise ConfigError("linear merge with normalize: the weights sum to zero")
        out = out / s
    return out


@merge_method("task_arithmetic", params={"normalize": Param(False, check=check_bool), "lambda": _LAM,
                                         "int8_mask": _INT8},
              model_params={"weight": _W}, reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(deltas, weight, normalize=False, lam=1.0, **_) -> torch.Tensor:
    """Task arithmetic: tau = lambda * sum_k w_k tau_k (divided by sum w_k when normalize)."""
    return combine_deltas(deltas, weight, normalize=normalize, lam=lam)


@merge_method("ties", params={"normalize": Param(True, check=check_bool), "lambda": _LAM, "int8_mask": _INT8,
                              "rescale": Param(False, check=check_rescale)},
              model_params={"weight": _W, "density": _D}, reference="https://arxiv.org/abs/2306.01708")
def ties(deltas, weight, density, normalize=True, lam=1.0, rescale=False, **_) -> torch.Tensor:
    """TIES: trim each task vector to its top-density entries, elect signs, average the agreeing entries."""
    return combine_deltas(deltas, weight, mask_fn=lambda k, d: magnitude_mask(d, density[k]), densities=density,
                          rescale=rescale, consensus=True, normalize=normalize, lam=lam)


def _dare(deltas, weight, density, rescale, seed, name, consensus, normalize, lam):
    def mask(k, d):
        return random_mask(d, density[k], torch.Generator().manual_seed(tensor_seed(seed, name, k)))

    return combine_deltas(deltas, weight, mask_fn=mask, densities=density, rescale=rescale, consensus=consensus,
                          normalize=normalize, lam=lam)


@merge_method("dare_linear", params={"normalize": Param(False, check=check_bool), "lambda": _LAM,
                                     "rescale": Param(True, check=check_rescale), "int8_mask": _INT8},
              model_params={"weight": _W, "density": _D}, random=True, reference="https://arxiv.org/abs/2311.03099")
def dare_linear(deltas, weight, density, normalize=False, lam=1.0, rescale=True, seed=0, name="", **_):
    """DARE: drop entries of each task vector at random (keep density), rescale, then task arithmetic."""
    return _dare(deltas, weight, density, rescale, seed, name, False, normalize, lam)


@merge_method("dare_ties", params={"normalize": Param(False, check=check_bool), "lambda": _LAM,
                                   "rescale": Param(True, check=check_rescale), "int8_mask": _INT8},
              model_params={"weight": _W, "density": _D}, random=True, reference="https://arxiv.org/abs/2311.03099")
def dare_ties(deltas, weight, density, normalize=False, lam=1.0, rescale=True, seed=0, name="", **_):
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election and disjoint sum."""
    return _dare(deltas, weight, density, rescale, seed, name, True, normalize, lam)


@merge_method("breadcrumbs", params={"normalize": Param(False, check=check_bool), "lambda": _LAM,
                                     "rescale": Param(False, check=check_rescale), "int8_mask": _INT8},
              model_params={"weight": _W, "density": Param(0.9, check=check_density),
                            "gamma": Param(0.01, check=check_unit, help="fraction of largest entries removed")},
              reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas, weight, density, gamma, normalize=False, lam=1.0, rescale=False, **_):
    """Model Breadcrumbs: drop each task vector's largest outliers (gamma) and smallest entries, then add."""
    return combine_deltas(deltas, weight, mask_fn=lambda k, d: outlier_mask(d, density[k], gamma[k]),
                          densities=density, rescale=rescale, normalize=normalize, lam=lam)


@merge_method("breadcrumbs_ties", params={"normalize": Param(False, check=check_bool), "lambda": _LAM,
                                          "rescale": Param(False, check=check_rescale), "int8_mask": _INT8},
              model_params={"weight": _W, "density": Param(0.9, check=check_density),
                            "gamma": Param(0.01, check=check_unit)},
              reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(deltas, weight, density, gamma, normalize=False, lam=1.0, rescale=False, **_):
    """Model Breadcrumbs with TIES' sign election."""
    return combine_deltas(deltas, weight, mask_fn=lambda k, d: outlier_mask(d, density[k], gamma[k]),
                          densities=density, rescale=rescale, consensus=True, normalize=normalize, lam=lam)


@merge_method("fisher", params={"fisher_floor": Param(1e-6, check=check_positive,
                                                      help="added to every Fisher value (no division by zero)"),
                                "lambda": _LAM},
              model_params={"weight": _W, "fisher": Param(None, help="diagonal Fisher: a .safetensors file "
                                                                "(checkpoints) or a task name (patches)")},
              reference="https://arxiv.org/abs/2111.09832", mergekit=False)
def fisher(deltas, weight, fisher, fisher_floor=1e-6, lam=1.0, **_) -> torch.Tensor:
    """Fisher-weighted averaging: tau = sum_k w_k F_k tau_k / sum_k w_k F_k (diagonal Fisher, per entry)."""
    num = den = None
    for k in range(len(deltas)):
        f = fisher[k].float() + fisher_floor
        wf = f * float(weight[k])
        t = wf * deltas[k].float()
        num = t if num is None else num + t
        den = wf if den is None else den + wf
        del f, wf, t
    out = num / den
    return out * lam if lam != 1 else out


@merge_method("slerp", space="pair", params={"t": Param(None, required=True, check=check_unit,
                                                         help="0 = the base model, 1 = the other model")},
              reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8,
          **_) -> torch.Tensor:
    """SLERP: spherical interpolation between two tensors (the base at t=0, the other at t=1), lerp when colinear."""
    a32, b32 = a.float(), b.float()
    # norms and dot accumulated in float64, a chunk at a time (a float32 sum over millions of entries
    # drifts by ~1e-4, which moves the result more than float tolerance)
    fa, fb = a32.reshape(-1), b32.reshape(-1)
    saa = sbb = sab = 0.0
    for i in range(0, fa.numel(), 1 << 20):
        x, y = fa[i: i + (1 << 20)].double(), fb[i: i + (1 << 20)].double()
        saa += float(x @ x)
        sbb += float(y @ y)
        sab += float(x @ y)
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = max(-1.0, min(1.0, sab / (na * nb)))
    if abs(dot) > dot_threshold:
        return (1 - t) * a32 + t * b32
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a32 + (math.sin(t * theta) / s) * b32


# ---------------------------------------------------------------- one tensor, any method
def merge_tensor(method: MergeMethod, name: str, base: torch.Tensor | None, inputs: Sequence[torch.Tensor],
                 model_params: list[dict], params: dict, seed: int = 0) -> torch.Tensor:
    """Merge one tensor: `inputs` are task vectors (delta methods), full weights (linear), or the other
    model's weight (slerp, with `base`). Returns the merged full weight when `base` is given, else the delta.
    """
    kw = {("lam" if k == "lambda" else k): v for k, v in params.items()}
    for key in method.model_params:
        kw[key] = [mp.get(key, method.model_params[key].default) for mp in model_params]
    if method.space == "pair":
        if base is None or len(inputs) != 1:
            raise ConfigError("slerp merges exactly two models: the base model and one other")
        return method.fn(base, inputs[0], **kw)
    if method.space == "weights":
        return method.fn(inputs, **kw)
    out = method.fn(inputs, seed=seed, name=name, **kw)
    return out if base is None else base.float() + out
