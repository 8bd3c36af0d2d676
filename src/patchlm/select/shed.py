"""SHED (Shapley-based dataset refinement, NeurIPS 2024): clusters, proxies, group leave-out Shapley, QOCS / QWCS.

Pure functions on arrays and a utility callable; embedding, models and files stay in the callers. Where we differ
from the official code (see ../shared/METHODS.md): KMeans is seeded; the empty set's utility is measured (the
official code takes 0); a removed group's drop is shared equally by its members, so the values of one permutation
sum to u(all proxies) - u(no proxy); values of exactly 0 are kept; QWCS drops clusters that ran out of members, so
it cannot loop forever, and it standardises the values before exp(beta x value) (the official exp(value) has no
temperature and, on accuracy drops of 1e-3, is uniform).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from patchlm.errors import ConfigError

Utility = Callable[[list[int]], float]


class Stopped(Exception):
    """group_leave_out stopped on request after a round (its state went to the checkpoint first)."""


def cluster(emb: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded KMeans (k-means++ init) of the rows of `emb`: (cluster of each row [N], centroids [k, D])."""
    from sklearn.cluster import KMeans

    if k > len(emb):
        raise ConfigError(f"clusters ({k}) must not exceed the number of examples ({len(emb)})", field="clusters")
    km = KMeans(n_clusters=k, random_state=seed, n_init=1).fit(emb.astype(np.float64))
    return km.labels_.astype(np.int64), km.cluster_centers_


def members_by_distance(emb: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> list[list[int]]:
    """The members of each cluster, nearest its centroid first (the first one is the cluster's proxy)."""
    out: list[list[int]] = []
    for c in range(len(centroids)):
        idx = np.flatnonzero(assign == c)
        d = ((emb[idx] - centroids[c]) ** 2).sum(1)
        out.append([int(i) for i in idx[np.argsort(d, kind="stable")]])
    return out


@dataclass
class ShapleyEstimate:
    """Monte-Carlo group leave-out values of the proxies: mean over permutations and its standard error."""

    values: np.ndarray           # [C]
    stderr: np.ndarray           # [C] (nan with a single permutation)
    contributions: np.ndarray    # [R, C]: each permutation's share of the drop credited to each proxy
    u_full: float
    u_empty: float
    evaluations: int             # utility calls, u(all) and u(none) included
    rounds: list[dict] = field(default_factory=list)


def permutation_groups(n: int, group_size: int, seed: int, p: int) -> list[np.ndarray]:
    """Permutation p of the proxies 0..n-1 cut into removal groups (a pure function of seed and p)."""
    order = np.random.default_rng([seed, p]).permutation(n)
    return [order[i: i + group_size] for i in range(0, n, group_size)]


def group_leave_out(n: int, utility: Utility, permutations: int, group_size: int, seed: int, *,
                    empty_utility: Callable[[], float] | None = None, state: dict | None = None,
                    checkpoint: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None,
                    progress: bool = False) -> ShapleyEstimate:
    """SHED's Shapley estimate: per permutation, start from all n proxies and remove random groups until none is
    left; each removal's utility drop u(S) - u(S minus G) is shared by the members of G.

    utility(sorted proxy indices) scores a non-empty set; empty_utility() scores the empty set (default: the
    utility of an empty list). `state` is what `checkpoint(state)` last received (resume); checkpoint is called
    after every round; when stop() is true after a round (its state saved) it raises Stopped.
    """
    if n <= 0:
        raise ConfigError("SHED needs at least one proxy", field="clusters")
    if group_size > n:
        group_size = n
    st = dict(state) if state else {}
    contrib = np.asarray(st.get("contributions", np.zeros((permutations, n))), dtype=np.float64).reshape(
        permutations, n)
    evals = int(st.get("evaluations", 0))
    rounds: list[dict] = list(st.get("rounds", []))
    if "u_full" in st:
        u_full, u_empty = float(st["u_full"]), float(st["u_empty"])
    else:
        u_full = float(utility(list(range(n))))
        u_empty = float(empty_utility() if empty_utility is not None else utility([]))
        evals += 2
    p0, r0 = int(st.get("perm", 0)), int(st.get("round", 0))
    u_prev = float(st.get("u_prev", u_full))
    per_perm = math.ceil(n / group_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=permutations * per_perm, initial=p0 * per_perm + r0, desc="shapley", unit="round",
                   leave=False)

    def snapshot(p: int, r: int, u: float) -> dict:
        return {"perm": p, "round": r, "u_prev": u, "u_full": u_full, "u_empty": u_empty, "evaluations": evals,
                "contributions": contrib.copy(), "rounds": list(rounds)}

    try:
        for p in range(p0, permutations):
            groups = permutation_groups(n, group_size, seed, p)
            kept = np.ones(n, dtype=bool)
            for g in groups[: r0 if p == p0 else 0]:
                kept[g] = False
            if p != p0:
                u_prev = u_full
            for r in range(r0 if p == p0 else 0, len(groups)):
                g = groups[r]
                kept[g] = False
                rest = [int(i) for i in np.flatnonzero(kept)]
                if rest:
                    u_new = float(utility(rest))
                    evals += 1
                else:
                    u_new = u_empty
                contrib[p, g] = (u_prev - u_new) / len(g)
                rounds.append({"perm": p, "round": r, "size": len(rest), "utility": u_new})
                u_prev = u_new
                if bar:
                    bar.update(1)
                nxt = (p, r + 1) if r + 1 < len(groups) else (p + 1, 0)
                if checkpoint is not None:
                    checkpoint(snapshot(*nxt, u_prev if nxt[0] == p else u_full))
                if stop is not None and stop():
                    raise Stopped(f"permutation {nxt[0] + 1} round {nxt[1] + 1}")
            r0 = 0
    finally:
        if bar:
            bar.close()
    values = contrib.mean(0)
    stderr = contrib.std(0, ddof=1) / math.sqrt(permutations) if permutations > 1 else np.full(n, np.nan)
    return ShapleyEstimate(values=values, stderr=stderr, contributions=contrib, u_full=u_full, u_empty=u_empty,
                           evaluations=evals, rounds=rounds)


def qocs(values: Sequence[float], members: Sequence[Sequence[int]], budget: int) -> list[tuple[int, int]]:
    """Quality-ordered cluster sampling: whole clusters by descending value (ties: lower cluster id) until the
    budget; the last cluster contributes its members nearest the centroid. Returns (example, cluster) pairs."""
    out: list[tuple[int, int]] = []
    order = sorted(range(len(values)), key=lambda c: (-float(values[c]), c))
    for c in order:
        for i in members[c]:
            if len(out) == budget:
                return out
            out.append((int(i), c))
    return out


def qwcs(values: Sequence[float], members: Sequence[Sequence[int]], budget: int, beta: float,
         seed: int) -> list[tuple[int, int]]:
    """Quality-weighted cluster sampling: draw a cluster with p ~ exp(beta x standardised value), then one of its
    members without replacement; a cluster that runs out leaves the draw, so any budget up to the pool ends."""
    v = np.asarray(values, dtype=np.float64)
    sd = v.std()
    z = (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)
    logits = beta * z
    rng = np.random.default_rng([seed, 7])
    left = [list(m) for m in members]
    active = [c for c in range(len(left)) if left[c]]
    out: list[tuple[int, int]] = []
    while len(out) < budget and active:
        w = np.exp(logits[active] - logits[active].max())
        c = active[int(rng.choice(len(active), p=w / w.sum()))]
        out.append((int(left[c].pop(int(rng.integers(len(left[c]))))), c))
        if not left[c]:
            active.remove(c)
    return out
