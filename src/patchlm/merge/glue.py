"""Model-GLUE over a zoo of fine-tuned variants of one base: similarity, families, selective merging, CMA-ES.

1. Similarity of two models: the mean per-column cosine similarity of their attention and MLP weight
   matrices (raw weights by default; `on="delta"` compares task vectors instead).
2. Families: models join the first family whose first member is more similar than `threshold` (0.95),
   within one architecture.
3. Selective merging inside a family, scored on validation data by a `scorer(coefficients) -> score`:
   Average (greedy, by validation score, coefficients ((k+1)/(k+2), 1/(k+2)), keep a model only when the
   score does not drop), Coefficient (the same with a 0.1..0.9 grid for the newcomer), Similarity (Average
   in order of similarity to the best model), and CMA-ES over the merge weights (`cma` package; popsize
   4 + 3 ln n, sigma0 1/6).
4. Mixing the merged families (model-level mixture with a router) belongs to the MoE work: `mix_families`
   is the boundary it will fill.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from patchlm.errors import ConfigError

ATTN_MLP = re.compile(r"(self_attn|attention|attn|mlp|feed_forward)\.")
HEURISTICS = ("average", "coefficient", "similarity", "cmaes")


# ---------------------------------------------------------------- similarity
def column_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over columns j of cos(a[:, j], b[:, j]) (a column = one input feature's weights)."""
    if a.shape != b.shape:
        raise ConfigError(f"cannot compare weights of shapes {list(a.shape)} and {list(b.shape)}")
    a, b = a.float().reshape(a.shape[0], -1), b.float().reshape(b.shape[0], -1)
    num = (a * b).sum(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return float((num / den.clamp_min(eps)).mean())


def is_attn_mlp_weight(name: str, shape) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and bool(ATTN_MLP.search(name))


class WeightView:
    """The attention/MLP weights of one zoo member: a checkpoint, or base weights plus a patch's dW."""

    def __init__(self, name: str, base_source, deltas=None, only_delta: bool = False):
        self.name, self.base_source, self.deltas, self.only_delta = name, base_source, deltas, only_delta

    def names(self) -> list[str]:
        return [n for n, (_, _, shape) in self.base_source.meta.items() if is_attn_mlp_weight(n, shape)]

    def get(self, tensor_name: str, base_t: torch.Tensor | None = None) -> torch.Tensor:
        module = tensor_name[: -len(".weight")]
        d = self.deltas.get(module) if self.deltas is not None else None
        if self.only_delta:
            if self.deltas is None:
                w = self.base_source.read(tensor_name).float()
                return w - base_t if base_t is not None else w
            return d if d is not None else torch.zeros(self.base_source.meta[tensor_name][2])
        w = base_t if (self.deltas is not None and base_t is not None) else self.base_source.read(tensor_name).float()
        return w + d if d is not None else w


def similarity_matrix(views: Sequence[WeightView], base_source=None) -> list[list[float]]:
    """Pairwise mean per-column cosine over the attention and MLP matrices (streamed tensor by tensor)."""
    n = len(views)
    names = views[0].names()
    sums = [[0.0] * n for _ in range(n)]
    for tn in names:
        base_t = base_source.read(tn).float() if base_source is not None else None
        ws = [v.get(tn, base_t) for v in views]
        for i in range(n):
            for j in range(i + 1, n):
                sums[i][j] += column_cosine(ws[i], ws[j])
        del ws
    sim = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            sim[i][j] = sim[j][i] = sums[i][j] / max(1, len(names))
    return sim


def cluster(sim: Sequence[Sequence[float]], threshold: float = 0.95,
            architectures: Sequence[str] | None = None) -> list[list[int]]:
    """Families: each model joins the first family (same architecture) whose first member is > threshold similar."""
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    fams: list[list[int]] = []
    for i in range(len(sim)):
        for f in fams:
            same_arch = architectures is None or architectures[f[0]] == architectures[i]
            if same_arch and sim[f[0]][i] > threshold:
                f.append(i)
                break
        else:
            fams.append([i])
    return fams


# ---------------------------------------------------------------- selection
Scorer = Callable[[dict[int, float]], float]


@dataclass
class Selection:
    heuristic: str
    weights: dict[int, float]
    score: float
    steps: list[dict] = field(default_factory=list)
    evaluations: int = 0

    def kept(self, tol: float = 1e-6) -> list[int]:
        return [i for i, w in self.weights.items() if abs(w) > tol]

    def to_dict(self, names: Sequence[str] | None = None) -> dict:
        d = asdict(self)
        if names is not None:
            d["weights"] = {names[i]: w for i, w in self.weights.items()}
            d["kept"] = [names[i] for i in self.kept()]
            for s in d["steps"]:
                if "member" in s:
                    s["member"] = names[s["member"]]
        return d


class CachedScorer:
    """Memoizes a scorer on rounded coefficients and counts real evaluations."""

    def __init__(self, fn: Scorer):
        self.fn, self.cache, self.calls, self.requests = fn, {}, 0, 0

    def __call__(self, coefs: dict[int, float]) -> float:
        self.requests += 1
        key = tuple(sorted((i, round(float(w), 6)) for i, w in coefs.items() if abs(w) > 1e-12))
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = float(self.fn(dict(key)))
        return self.cache[key]


def _greedy(order: Sequence[int], scorer: Scorer, candidates: Callable[[dict, int], list[dict]],
            name: str) -> Selection:
    cur = {order[0]: 1.0}
    cur_score = scorer(cur)
    steps = [{"member": order[0], "kept": True, "score": cur_score, "reason": "starting point"}]
    for j in order[1:]:
        best, best_score = None, -math.inf
        for cand in candidates(cur, j):
            s = scorer(cand)
            if s > best_score:
                best, best_score = cand, s
        keep = best_score >= cur_score
        steps.append({"member": j, "kept": keep, "score": best_score, "coefficient": best[j],
                      "reason": (f"kept: validation {cur_score:.4f} -> {best_score:.4f}" if keep else
                                 f"left out: validation would drop {cur_score:.4f} -> {best_score:.4f}")})
        if keep:
            cur, cur_score = best, best_score
    return Selection(name, cur, cur_score, steps)


def _average_candidates(cur: dict, j: int) -> list[dict]:
    k1 = len(cur)  # k + 1 models merged so far
    new = {i: w * k1 / (k1 + 1) for i, w in cur.items()}
    new[j] = 1.0 / (k1 + 1)
    return [new]


def greedy_average(order: Sequence[int], scorer: Scorer) -> Selection:
    """Add models in `order` with coefficients ((k+1)/(k+2), 1/(k+2)); keep one only if the score does not drop."""
    return _greedy(order, scorer, _average_candidates, "average")


def greedy_coefficient(order: Sequence[int], scorer: Scorer,
                       grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> Selection:
    """Like Average, but the newcomer's coefficient c (the merge keeps 1-c) is searched on a grid."""
    def cands(cur, j):
        return [{**{i: w * (1 - c) for i, w in cur.items()}, j: c} for c in grid]

    return _greedy(order, scorer, cands, "coefficient")


def similarity_selection(best: int, sim: Sequence[Sequence[float]], members: Sequence[int], scorer: Scorer,
                         most_similar_first: bool = True) -> Selection:
    """Average-style greedy merging in order of similarity to the best single model."""
    rest = sorted((i for i in members if i != best), key=lambda i: sim[best][i], reverse=most_similar_first)
    sel = _greedy([best] + rest, scorer, _average_candidates, "similarity")
    return sel


def cmaes_search(members: Sequence[int], scorer: Scorer, trials: int = 200, sigma0: float = 1 / 6,
                 seed: int = 0, popsize: int | None = None, x0: Sequence[float] | None = None) -> Selection:
    """CMA-ES over the merge weights of `members` (start: uniform), maximizing the validation score."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma warns when matplotlib (plots only) is missing
        import cma

    n = len(members)
    if trials <= 0:
        raise ConfigError(f"trials must be positive, got {trials}")
    if n == 1:
        w = {members[0]: 1.0}
        return Selection("cmaes", w, scorer(w), [], 1)
    pop = popsize or int(4 + 3 * math.log(n))
    x0 = list(x0) if x0 is not None else [1.0 / n] * n
    es = cma.CMAEvolutionStrategy(x0, sigma0, {"popsize": pop, "seed": seed + 1, "verbose": -9,
                                               "maxfevals": trials})
    best_w, best_s, evals, steps = None, -math.inf, 0, []
    while not es.stop() and evals < trials:
        xs = es.ask()
        xs = xs[: trials - evals]
        fs = []
        for x in xs:
            w = {m: float(v) for m, v in zip(members, x)}
            s = scorer(w)
            evals += 1
            fs.append(-s)
            if s > best_s:
                best_w, best_s = w, s
        if len(xs) < pop:
            break
        es.tell(xs, fs)
        steps.append({"generation": len(steps) + 1, "best_score": best_s})
    return Selection("cmaes", best_w, best_s, steps, evals)


def mix_families(merged_families: Sequence, strategy: str = "model-level", **kwargs):
    """Model-GLUE step 3: mix the merged families (model-level router, block- or FFN-level experts).

    Left for the MoE work (it needs a router patch kind); this is the function it will fill.
    """
    raise NotImplementedError("mixing merged families comes with the MoE work (router patches); "
                              "use the best family's merge for now")


# ---------------------------------------------------------------- the whole recipe on patches
def patch_scorer(base, patches, tasks, limit: int = 50, bf16: bool = False, max_length: int = 256,
                 split: str = "validation", batch_size: int = 16) -> Scorer:
    """Score coefficients by the mean validation accuracy over `tasks` of the stacked-LoRA linear merge."""
    from patchlm.evaluate import evaluate
    from patchlm.merge.patches import merge_patches
    from patchlm.patch import get_kind

    def score(coefs: dict[int, float]) -> float:
        idx = sorted(coefs)
        merged = merge_patches([patches[i] for i in idx], "task_arithmetic", weights=[coefs[i] for i in idx],
                               force=True)
        merged.apply(base, force=True)
        try:
            accs = [evaluate(base.model, base.tokenizer, t, split=split, limit=limit, bf16=bf16,
                             max_length=max_length, batch_size=batch_size)["accuracy"] for t in tasks]
        finally:
            get_kind("lora").detach(base.model)
        return sum(accs) / len(accs)

    return score


def run_glue(base, patches, names: Sequence[str], tasks, heuristics: Sequence[str] = HEURISTICS,
             threshold: float = 0.95, limit: int = 50, trials: int = 200, seed: int = 0, bf16: bool = False,
             max_length: int = 256, on: str = "weights", scorer: Scorer | None = None, log=None) -> dict:
    """Similarity, families, and each selection heuristic on a zoo of patches of one base; a report."""
    from patchlm.merge.patches import PatchDeltas, check_same_base
    from patchlm.merge.stream import Checkpoint

    log = log or (lambda m: None)
    unknown = [h for h in heuristics if h not in HEURISTICS]
    if unknown:
        raise ConfigError(f"unknown heuristic {unknown[0]!r}; choices: {', '.join(HEURISTICS)}")
    if on not in ("weights", "delta"):
        raise ConfigError(f"similarity on {on!r}: choose weights or delta")
    if len(patches) < 2:
        raise ConfigError("a zoo needs at least two patches")
    check_same_base(patches)
    src = Checkpoint(base.path or base.name)
    views = [WeightView(n, src, PatchDeltas(p), only_delta=(on == "delta")) for n, p in zip(names, patches)]
    log("similarity")
    sim = similarity_matrix(views, base_source=src)
    del views
    fams = cluster(sim, threshold, [p.base.get("architecture") for p in patches])
    scorer = CachedScorer(scorer or patch_scorer(base, patches, tasks, limit=limit, bf16=bf16, max_length=max_length))
    log("individual scores")
    single = {i: scorer({i: 1.0}) for i in range(len(patches))}
    fam = max(fams, key=lambda f: (len(f), max(single[i] for i in f)))  # the largest family (ties: best member)
    order = sorted(fam, key=lambda i: single[i], reverse=True)
    results = {}
    before = scorer.calls
    merge_all = {i: 1.0 / len(fam) for i in fam}
    all_score = scorer(merge_all)
    for h in heuristics:
        log(h)
        c0, r0 = scorer.calls, scorer.requests
        if h == "average":
            sel = greedy_average(order, scorer)
        elif h == "coefficient":
            sel = greedy_coefficient(order, scorer)
        elif h == "similarity":
            sel = similarity_selection(order[0], sim, fam, scorer)
        else:
            sel = cmaes_search(order, scorer, trials=trials, seed=seed)
        sel.evaluations = scorer.requests - r0  # merges scored by this heuristic (cached ones included)
        results[h] = sel.to_dict(names)
        results[h]["new_evaluations"] = scorer.calls - c0
    best_h = max(results, key=lambda h: results[h]["score"]) if results else None
    report = {
        "members": [{"name": names[i], "validation_score": single[i],
                     "family": next(k for k, f in enumerate(fams) if i in f)} for i in range(len(patches))],
        "similarity": {"on": on, "matrix": sim}, "threshold": threshold, "families": [[names[i] for i in f] for f in fams],
        "merged_family": [names[i] for i in fam], "merge_all": {"weights": {names[i]: w for i, w in merge_all.items()},
                                                                "score": all_score},
        "heuristics": results, "best": best_h, "evaluations": scorer.calls, "scored_before_heuristics": before,
        "tasks": [t.name for t in tasks], "limit": limit,
    }
    return report

