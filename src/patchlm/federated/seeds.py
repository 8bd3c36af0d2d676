"""Federated tuning with seeds and scalars instead of tensors: FedKSeed (ICML 2024) and Ferret, as pure functions.

Both write every model of the run as theta = theta_0 + sum_terms c * z(key, query), where z is a seeded random
direction per tensor (patchlm.train.zo.Directions: drawn on CPU generators, fp32, one tensor at a time, tensor
index = position in sorted-name order), so the server and every client rebuild the same model from a few scalars.

FedKSeed. K candidate seeds are drawn once per run from its seed. A local zeroth-order step picks one of them
(uniformly, or with FedKSeed-Pro's probabilities), measures the projected gradient g = (L(theta + eps z) -
L(theta - eps z)) / (2 eps) and moves theta by -lr g z; the client sends its per-seed sums of g (only the non-zero
ones, as (index, value) pairs: the K-vector is mostly zero when local steps << K). The server sums them weighted by
data size, G^r = sum_k p_k g_k, and every party replays theta_r = theta_0 - lr sum_s G_s z_s with G the sum of the
rounds' G^r *since round 0*, so one replay costs K x d draws at most (seeds never chosen cost nothing) whatever the
round count, and nothing drifts: the state is recomputed from theta_0 in float64 and rounded to fp32 once.

Ferret. Clients train first order; the update delta_i of each tensor i (a parameter group) is projected on n
shared bases z_ij (seeded by the run and round, query j): c_ij = <delta_i, z_ij>. We ship the UNBIASED
reconstruction delta_i' = (1/n) sum_j c_ij z_ij, unbiased because E[z z^T] = I for Gaussian (or Rademacher)
entries. (The official code draws bases roughly uniform on +-1/sqrt(d) and scales by d/n, which gives E = delta/3,
compensated by a large server learning rate.) The server averages the coefficients (linear, so it averages the
reconstructions) and every party adds each round's reconstruction to theta_0: replay costs n x d draws per round
seen so far.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence

import torch

from patchlm.errors import ConfigError
from patchlm.federated.signing import tensors_digest
from patchlm.train.zo import Directions, rademacher

Term = tuple[int, int, "float | Sequence[float]"]  # (direction key, query, coefficient: one, or one per tensor)


# ---------------------------------------------------------------- seeds
def candidate_seeds(seed: int, k: int) -> list[int]:
    """FedKSeed's K distinct candidate seeds, drawn once from the run's seed (Python's Mersenne Twister: the
    same list on every machine)."""
    if k <= 0:
        raise ConfigError(f"seeds (K) must be positive, got {k}", field="seeds")
    return random.Random(int(seed) * 2_654_435_761 + 97).sample(range(1, 2**31), k)


def ferret_key(seed: int, round_: int) -> int:
    """The direction key of round r's shared Ferret bases (query j = basis j)."""
    return random.Random(int(seed) * 1_000_033 + 7 * int(round_) + 3).randrange(1, 2**31)


def seed_probabilities(history: Sequence[torch.Tensor], mode: str) -> list[float] | None:
    """How a local step picks its seed: None (uniform) for mode uniform or before any round; for pro
    (FedKSeed-Pro) softmax of the min-max normalised mean |G^r_s| over the rounds where seed s was used (a seed
    not used yet takes the mean of the used ones), so the likeliest seed is at most e ~ 2.7x likelier than the
    least. `history` holds each round's aggregated dense K-vector; every party computes the same list."""
    if mode == "uniform" or not history:
        return None
    if mode != "pro":
        raise ConfigError(f"unknown seed_probability {mode!r}; choices: uniform, pro", field="seed_probability")
    mags = torch.stack([h.double().abs() for h in history])
    used = (mags > 0).sum(0)
    mean = torch.where(used > 0, mags.sum(0) / used.clamp(min=1), torch.zeros_like(mags[0]))
    if not bool((used > 0).any()):
        return None
    mean = torch.where(used > 0, mean, mean[used > 0].mean())
    lo, hi = float(mean.min()), float(mean.max())
    score = (mean - lo) / (hi - lo) if hi > lo else torch.zeros_like(mean)
    return torch.softmax(score, 0).tolist()


# ---------------------------------------------------------------- scalars on the wire
def to_pairs(dense: torch.Tensor) -> dict[str, torch.Tensor]:
    """A K-vector as its non-zero entries: index (int32, increasing) and value (float32)."""
    idx = torch.nonzero(dense, as_tuple=False).flatten()
    return {"index": idx.to(torch.int32).contiguous(), "value": dense[idx].float().contiguous()}


def from_pairs(pairs: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """The dense float64 K-vector of `to_pairs` output (checked: see check_pairs)."""
    out = torch.zeros(k, dtype=torch.float64)
    out[pairs["index"].long()] = pairs["value"].double()
    return out


def check_pairs(pairs: dict[str, torch.Tensor], k: int) -> str | None:
    """None when (index, value) is a well-formed sparse K-vector with finite values, else the reason."""
    if set(pairs) != {"index", "value"}:
        return f"expected seed scalars as index and value, got {sorted(pairs)}"
    idx, val = pairs["index"], pairs["value"]
    if idx.dtype != torch.int32 or val.dtype != torch.float32 or idx.dim() != 1 or val.shape != idx.shape:
        return f"seed scalars must be int32 index and float32 value of one length, got {idx.dtype} " \
               f"{tuple(idx.shape)} and {val.dtype} {tuple(val.shape)}"
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
        return f"seed index out of range 0..{k - 1}"
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return "seed indices must be strictly increasing (each seed once)"
    bad = (~torch.isfinite(val)).nonzero().flatten()
    if bad.numel():
        return f"non-finite seed scalar (NaN or inf) for seed index {int(idx[bad[0]])}"
    return None


def check_coefficients(coef: torch.Tensor, shape: tuple[int, int]) -> str | None:
    """None when Ferret's coefficient matrix has the run's shape [tensors, bases] and finite float32 values."""
    if coef.dtype != torch.float32 or tuple(coef.shape) != tuple(shape):
        return f"ferret coefficients must be float32 of shape {list(shape)}, got {coef.dtype} {list(coef.shape)}"
    bad = (~torch.isfinite(coef)).nonzero()
    if bad.numel():
        return f"non-finite ferret coefficient (NaN or inf) at tensor {int(bad[0, 0])}, basis {int(bad[0, 1])}"
    return None


def aggregate_scalars(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k p_k v_k in float64, in the given (fixed) client order: FedKSeed's K-vectors or Ferret's matrices."""
    if not vectors or len(vectors) != len(weights):
        raise ConfigError(f"aggregate_scalars: {len(vectors)} vectors and {len(weights)} weights")
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for v, p in zip(vectors, weights, strict=True):
        out.add_(v.double(), alpha=float(p))
    return out


def cumulative(history: Sequence[torch.Tensor]) -> torch.Tensor:
    """G = sum_r G^r (float64, in round order: every party sums the same values in the same order)."""
    out = torch.zeros_like(history[0], dtype=torch.float64)
    for h in history:
        out.add_(h.double())
    return out


# ---------------------------------------------------------------- replay
def fedkseed_terms(candidates: Sequence[int], g: torch.Tensor, lr: float) -> list[Term]:
    """theta_0 - lr sum_s G_s z_s as replay terms (seeds with G_s = 0 are skipped: they cost nothing)."""
    nz = torch.nonzero(g).flatten().tolist()
    return [(int(candidates[i]), 0, -float(lr) * float(g[i])) for i in nz]


def ferret_terms(seed: int, rounds: Sequence[torch.Tensor]) -> list[Term]:
    """Each round's unbiased reconstruction (1/n) sum_j c_ij z_ij as replay terms (rounds[r-1]: [tensors, n])."""
    out: list[Term] = []
    for r, coef in enumerate(rounds, start=1):
        key, n = ferret_key(seed, r), coef.shape[1]
        for j in range(n):
            out.append((key, j, (coef[:, j].double() / n).tolist()))
    return out


def draws(theta0: dict[str, torch.Tensor], terms: Sequence[Term]) -> int:
    """Random numbers a replay draws: d per term and tensor with a non-zero coefficient."""
    sizes = [theta0[n].numel() for n in sorted(theta0)]
    tot = 0
    for _, _, c in terms:
        tot += sum(sizes) if isinstance(c, (int, float)) else sum(s for s, x in zip(sizes, c, strict=True) if x)
    return tot


@torch.no_grad()
def replay(theta0: dict[str, torch.Tensor], base_seed: int, terms: Iterable[Term],
           distribution: str = "gaussian") -> dict[str, torch.Tensor]:
    """theta_0 + sum_terms c z(key, query), per tensor in sorted-name order: the directions drawn on CPU in fp32
    (device independent), the sum accumulated in float64 and rounded once to float32 (no low-precision drift)."""
    names = sorted(theta0)
    base = [theta0[n].detach().float().cpu() for n in names]
    dirs = Directions(names, base, int(base_seed), distribution=distribution)
    terms = list(terms)
    out = {}
    for i, n in enumerate(names):
        coeffs = [(key, query, float(c) if isinstance(c, (int, float)) else float(c[i])) for key, query, c in terms]
        acc = dirs.accumulate(i, [t for t in coeffs if t[2]], torch.zeros(base[i].shape, dtype=torch.float64))
        out[n] = acc.add_(base[i]).float()
    return out


def ferret_project(delta: dict[str, torch.Tensor], base_seed: int, key: int, n: int,
                   distribution: str = "gaussian") -> torch.Tensor:
    """Coefficients c_ij = <delta_i, z_ij> (float64 dots, float32 out) of each tensor's update on n bases."""
    names = sorted(delta)
    ts = [delta[nm].detach().double().cpu() for nm in names]
    dirs = Directions(names, ts, int(base_seed), distribution=distribution)
    out = torch.zeros(len(names), n, dtype=torch.float64)
    for i, t in enumerate(ts):
        flat = t.flatten()
        for j in range(n):
            out[i, j] = torch.dot(flat, dirs.z(i, key, j).flatten().double())
    return out.float()


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA3-512 (hex) of the replayed tensors' canonical serialisation: equal hashes = bit-identical models."""
    return tensors_digest({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}).hex()


def throughput(distribution: str = "gaussian", n: int = 1 << 22, reps: int = 5) -> float:
    """This machine's generator throughput in draws per second (fp32, one thread's torch settings as they are)."""
    g = torch.Generator().manual_seed(0)
    draw = (lambda: rademacher((n,), g)) if distribution == "rademacher" else \
        (lambda: torch.randn(n, generator=g))
    draw()
    t0 = time.perf_counter()
    for _ in range(reps):
        draw()
    return n * reps / (time.perf_counter() - t0)

