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

A method's hyper-parameters are its arguments annotated with `Hyper` (as mergekit's easy_define reads them from
the signature): the default is the signature's, the check and help travel with the annotation. A keyword name
gets a trailing underscore (`lambda_` is the config's `lambda`, see `param_key`).
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean

# ---------------------------------------------------------------- registry
Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Hyper:
    """Marks a method argument as a hyper-parameter (in `Annotated[type, Hyper(...)]`): its check, its help, and
    whether each model has its own value (mergekit's "tensor parameters": the method then receives one per model)."""

    check: Check | None = None
    help: str = ""
    per_model: bool = False


@dataclass(frozen=True)
class Param:
    """One hyper-parameter as read from a method's signature: default (required when the signature has none),
    the check, the help text, and `arg`, the Python argument it is passed as."""

    default: Any = None
    required: bool = False
    check: Check | None = None
    help: str = ""
    arg: str = ""


CONTEXT_ARGS = ("seed", "name")  # passed to methods that take them: the run seed and the tensor's name


def param_key(arg: str) -> str:
    """The config key of a Python argument: a trailing underscore marks a keyword (`lambda_` is mergekit's `lambda`)."""
    stem = arg.rstrip("_")
    return stem if arg != stem and keyword.iskeyword(stem) else arg


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    space: str  # "delta" (task vectors) | "weights" (full weights, like mergekit's linear) | "pair" (slerp)
    params: dict[str, Param] = field(default_factory=dict)  # shared by every model
    model_params: dict[str, Param] = field(default_factory=dict)  # per model ("tensor parameters" in mergekit)
    context: tuple[str, ...] = ()  # which of CONTEXT_ARGS the function takes
    reference: str = ""
    description: str = ""
    mergekit: bool = True  # mergekit has a method of this name with the same semantics

    @property
    def random(self) -> bool:
        """The method draws random numbers (it takes the run seed)."""
        return "seed" in self.context

    @property
    def needs_base(self) -> bool:
        return self.space in ("delta", "pair")

    def all_params(self) -> dict[str, Param]:
        return {**self.params, **self.model_params}

    def kwargs(self, params: dict, model_params: Sequence[dict]) -> dict[str, Any]:
        """The function's keyword arguments: shared values by argument name, per-model values as one list each
        (a model without a value gets the default)."""
        kw = {self.params[k].arg if k in self.params else k: v for k, v in params.items()}
        for key, p in self.model_params.items():
            kw[p.arg] = [mp.get(key, p.default) for mp in model_params]
        return kw


METHODS: dict[str, MergeMethod] = {}


def _signature_params(fn: Callable) -> tuple[dict[str, Param], dict[str, Param], tuple[str, ...]]:
    """(shared, per-model) hyper-parameters of `fn` and the context arguments it takes, read from its signature:
    an argument annotated with Hyper is a hyper-parameter, its signature default is its default."""
    hints = typing.get_type_hints(fn, include_extras=True)
    shared: dict[str, Param] = {}
    per_model: dict[str, Param] = {}
    for arg, p in inspect.signature(fn).parameters.items():
        marks = [m for m in getattr(hints.get(arg), "__metadata__", ()) if isinstance(m, Hyper)]
        if not marks:
            continue
        h = marks[0]
        required = p.default is inspect.Parameter.empty
        (per_model if h.per_model else shared)[param_key(arg)] = Param(
            None if required else p.default, required, h.check, h.help, arg)
    context = tuple(a for a in CONTEXT_ARGS if a in inspect.signature(fn).parameters)
    return shared, per_model, context


def merge_method(name: str, *, space: str = "delta", reference: str = "", mergekit: bool = True):
    """Decorator: register `fn` as merge method `name`; its hyper-parameters and their defaults are the arguments
    annotated with Hyper (one function, one registration, one test; each default written once, in the signature)."""

    def deco(fn):
        shared, per_model, context = _signature_params(fn)
        METHODS[name] = MergeMethod(name, fn, space, shared, per_model, context, reference,
                                    (fn.__doc__ or "").strip().splitlines()[0], mergekit)
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
                   normalize: bool = False, lambda_: float = 1.0) -> torch.Tensor:
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
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


# ---------------------------------------------------------------- hyper-parameter types (check and help, once)
Weight = Annotated[float, Hyper(check_real, "coefficient of this model's task vector", per_model=True)]
Density = Annotated[float, Hyper(check_density, "fraction of the task vector's entries kept", per_model=True)]
Gamma = Annotated[float, Hyper(check_unit, "fraction of largest entries removed", per_model=True)]
FisherInput = Annotated[Any, Hyper(None, "diagonal Fisher: a .safetensors file (checkpoints) or a task name "
                                         "(patches)", per_model=True)]
Normalize = Annotated[bool, Hyper(check_bool, "divide by the sum of weights")]
Lambda = Annotated[float, Hyper(check_real, "scale of the merged task vector")]
Rescale = Annotated[bool | str, Hyper(check_rescale, "after dropping: true or l1 (match the L1 norm), inverse "
                                                     "(divide by density) or false")]
Int8Mask = Annotated[bool, Hyper(check_bool, "mergekit's int8 mask (memory only: results are the same here)")]
FisherFloor = Annotated[float, Hyper(check_positive, "added to every Fisher value (no division by zero)")]
Fraction = Annotated[float, Hyper(check_unit, "0 = the base model, 1 = the other model")]


def _each(v, n: int) -> list:
    """A per-model value as one value per model (a scalar applies to all)."""
    if isinstance(v, (int, float, bool, str)) or v is None:
        return [v] * n
    return list(v)


@merge_method("linear", space="weights", reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: Sequence[torch.Tensor], weight: Weight = 1.0, normalize: Normalize = True) -> torch.Tensor:
    """Linear average (model soup): sum_k w_k theta_k, divided by sum_k w_k when normalize."""
    weight = _each(weight, len(tensors))
    out = None
    for k in range(len(tensors)):
        t = tensors[k].float() * float(weight[k])
        out = t if out is None else out + t
    if normalize:
        s = float(sum(weight))
        if abs(s) < 1e-8:
            raise ConfigError("linear merge with normalize: the weights sum to zero", field="weight")
        out = out / s
    return out


@merge_method("task_arithmetic", reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(deltas, weight: Weight = 1.0, normalize: Normalize = False, lambda_: Lambda = 1.0,
                    int8_mask: Int8Mask = False) -> torch.Tensor:
    """Task arithmetic: tau = lambda * sum_k w_k tau_k (divided by sum w_k when normalize)."""
    return combine_deltas(deltas, _each(weight, len(deltas)), normalize=normalize, lambda_=lambda_)


@merge_method("ties", reference="https://arxiv.org/abs/2306.01708")
def ties(deltas, weight: Weight = 1.0, density: Density = 1.0, normalize: Normalize = True, lambda_: Lambda = 1.0,
         int8_mask: Int8Mask = False, rescale: Rescale = False) -> torch.Tensor:
    """TIES: trim each task vector to its top-density entries, elect signs, average the agreeing entries."""
    n = len(deltas)
    density = _each(density, n)
    return combine_deltas(deltas, _each(weight, n), mask_fn=lambda k, d: magnitude_mask(d, density[k]),
                          densities=density, rescale=rescale, consensus=True, normalize=normalize, lambda_=lambda_)


def _dare(deltas, weight, density, rescale, seed, name, consensus, normalize, lambda_):
    n = len(deltas)
    density = _each(density, n)

    def mask(k, d):
        return random_mask(d, density[k], torch.Generator().manual_seed(tensor_seed(seed, name, k)))

    return combine_deltas(deltas, _each(weight, n), mask_fn=mask, densities=density, rescale=rescale,
                          consensus=consensus, normalize=normalize, lambda_=lambda_)


@merge_method("dare_linear", reference="https://arxiv.org/abs/2311.03099")
def dare_linear(deltas, weight: Weight = 1.0, density: Density = 1.0, normalize: Normalize = False,
                lambda_: Lambda = 1.0, rescale: Rescale = True, int8_mask: Int8Mask = False, seed: int = 0,
                name: str = "") -> torch.Tensor:
    """DARE: drop entries of each task vector at random (keep density), rescale, then task arithmetic."""
    return _dare(deltas, weight, density, rescale, seed, name, False, normalize, lambda_)


@merge_method("dare_ties", reference="https://arxiv.org/abs/2311.03099")
def dare_ties(deltas, weight: Weight = 1.0, density: Density = 1.0, normalize: Normalize = False,
              lambda_: Lambda = 1.0, rescale: Rescale = True, int8_mask: Int8Mask = False, seed: int = 0,
              name: str = "") -> torch.Tensor:
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election and disjoint sum."""
    return _dare(deltas, weight, density, rescale, seed, name, True, normalize, lambda_)


def _breadcrumbs(deltas, weight, density, gamma, normalize, lambda_, rescale, consensus):
    n = len(deltas)
    density, gamma = _each(density, n), _each(gamma, n)
    return combine_deltas(deltas, _each(weight, n), mask_fn=lambda k, d: outlier_mask(d, density[k], gamma[k]),
                          densities=density, rescale=rescale, consensus=consensus, normalize=normalize,
                          lambda_=lambda_)


@merge_method("breadcrumbs", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas, weight: Weight = 1.0, density: Density = 0.9, gamma: Gamma = 0.01,
                normalize: Normalize = False, lambda_: Lambda = 1.0, rescale: Rescale = False,
                int8_mask: Int8Mask = False) -> torch.Tensor:
    """Model Breadcrumbs: drop each task vector's largest outliers (gamma) and smallest entries, then add."""
    return _breadcrumbs(deltas, weight, density, gamma, normalize, lambda_, rescale, False)


@merge_method("breadcrumbs_ties", reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(deltas, weight: Weight = 1.0, density: Density = 0.9, gamma: Gamma = 0.01,
                     normalize: Normalize = False, lambda_: Lambda = 1.0, rescale: Rescale = False,
                     int8_mask: Int8Mask = False) -> torch.Tensor:
    """Model Breadcrumbs with TIES' sign election."""
    return _breadcrumbs(deltas, weight, density, gamma, normalize, lambda_, rescale, True)


@merge_method("fisher", reference="https://arxiv.org/abs/2111.09832", mergekit=False)
def fisher(deltas, weight: Weight = 1.0, fisher: FisherInput = None, fisher_floor: FisherFloor = 1e-6,
           lambda_: Lambda = 1.0) -> torch.Tensor:
    """Fisher-weighted averaging: tau = sum_k w_k F_k tau_k / sum_k w_k F_k (diagonal Fisher, per entry)."""
    weight = _each(weight, len(deltas))
    if fisher is None:
        raise ConfigError("fisher merging needs one diagonal Fisher per model", field="fisher")
    num = den = None
    for k in range(len(deltas)):
        f = fisher[k].float() + fisher_floor
        wf = f * float(weight[k])
        t = wf * deltas[k].float()
        num = t if num is None else num + t
        den = wf if den is None else den + wf
        del f, wf, t
    out = num / den
    return out * lambda_ if lambda_ != 1 else out


@merge_method("slerp", space="pair", reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(a: torch.Tensor, b: torch.Tensor, t: Fraction, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
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
                 model_params: list[dict], params: dict, seed: int = 0,
                 per_model_inputs: dict[str, Sequence] | None = None) -> torch.Tensor:
    """Merge one tensor: `inputs` are task vectors (delta methods), full weights (linear), or the other
    model's weight (slerp, with `base`). Returns the merged full weight when `base` is given, else the delta.
    `per_model_inputs` gives per-model tensors by parameter name (fisher: each model's Fisher of this tensor).
    """
    kw = method.kwargs(params, model_params)
    for key, seq in (per_model_inputs or {}).items():
        kw[method.model_params[key].arg] = seq
    context = {"seed": seed, "name": name}
    kw.update({a: context[a] for a in method.context})
    if method.space == "pair":
        if base is None or len(inputs) != 1:
            raise ConfigError("slerp merges exactly two models: the base model and one other")
        return method.fn(base, inputs[0], **kw)
    if method.space == "weights":
        return method.fn(inputs, **kw)
    out = method.fn(inputs, **kw)
    return out if base is None else base.float() + out
