"""Model-GLUE over a zoo of fine-tuned variants of one base: similarity, families, selective merging, CMA-ES.

Pure functions of tensors and of a score function (evaluation and checkpoint reading are in glue_runner.py):
1. Similarity of two models: the mean per-column cosine similarity of their attention and MLP weight
   matrices (`similarity_matrix` over the members' versions of each matrix, raw weights or task vectors).
2. Families: models join the first family whose first member is more similar than `threshold`,
   within one architecture.
3. Selective merging inside a family, scored on validation data by a `scorer(coefficients) -> score`:
   Average (greedy, by validation score, coefficients ((k+1)/(k+2), 1/(k+2)), keep a model only when the
   score does not drop), Coefficient (the same with a grid for the newcomer), Similarity (Average in order of
   similarity to the best model), and CMA-ES over the merge weights (`cma` package; popsize 4 + 3 ln n).
   `search` runs the whole selection on a similarity matrix and a scorer and picks the best heuristic.
4. Mixing the merged families (`mix`: model-, block- or FFN-level, with routers) is done by patchlm.moe.mixtures;
   `family_merges` (glue_runner.py) gives each family's merge to mix, and the report says what was mixed and why.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from patchlm.errors import ConfigError
from patchlm.typed import check_fields

ATTN_MLP = re.compile(r"(self_attn|attention|attn|mlp|feed_forward)\.")
HEURISTICS = ("average", "coefficient", "similarity", "cmaes")
SIMILARITY_ON = ("weights", "delta")
MIX_LEVELS = ("model", "block", "ffn")  # Model-GLUE's mixtures of the merged families (patchlm.moe.mixtures)


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclass
class GlueConfig:
    """Model-GLUE's knobs: families, the selection heuristics, how each candidate merge is scored."""

    heuristics: tuple[str, ...] = field(default=HEURISTICS, metadata={
        "help": "selection heuristics to run: " + " | ".join(HEURISTICS), "cli": False})
    threshold: float = field(default=0.95, metadata={"help": "similarity above which models form one family"})
    on: str = field(default="weights", metadata={
        "help": "similarity of raw weights (weights) or of task vectors (delta)"})
    limit: int = field(default=50, metadata={"help": "validation examples per task per score"})
    split: str = field(default="validation", metadata={"help": "the split candidate merges are scored on"})
    max_length: int = field(default=256, metadata={"help": "max tokens per example"})
    batch_size: int = field(default=16, metadata={"help": "examples per evaluation batch"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast while scoring"})
    trials: int = field(default=200, metadata={"help": "CMA-ES evaluations"})
    sigma0: float = field(default=1 / 6, metadata={"help": "CMA-ES initial step size"})
    seed: int = field(default=0, metadata={"help": "CMA-ES seed"})
    coefficient_grid: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), metadata={
        "help": "the Coefficient heuristic's candidate coefficients for a newcomer", "cli": False})
    mix: str | None = field(default=None, metadata={
        "help": "after merging, mix the merged families: " + " | ".join(MIX_LEVELS) + " (none: merge only)"})
    mix_layers: int = field(default=2, metadata={
        "help": "mix model: layers of the merged model whose pooled output the router reads"})
    mix_router_steps: int = field(default=0, metadata={
        "help": "mix: router-only training steps on the members' tasks (0: routers as initialised)"})

    def __post_init__(self) -> None:
        check_fields(self)
        self.heuristics = tuple(_split_names(self.heuristics) if isinstance(self.heuristics, str)
                                else self.heuristics)
        self.coefficient_grid = tuple(float(c) for c in self.coefficient_grid)
        unknown = [h for h in self.heuristics if h not in HEURISTICS]
        if unknown or not self.heuristics:
            raise ConfigError(f"unknown heuristic {unknown[0]!r}; choices: {', '.join(HEURISTICS)}" if unknown
                              else "heuristics is empty: choose from " + ", ".join(HEURISTICS), field="heuristics")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}", field="threshold")
        if self.on not in SIMILARITY_ON:
            raise ConfigError(f"similarity on {self.on!r}: choose weights or delta", field="on")
        for name in ("limit", "max_length", "batch_size", "trials"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.sigma0 <= 0:
            raise ConfigError(f"sigma0 must be positive, got {self.sigma0}", field="sigma0")
        if self.mix is not None and self.mix not in MIX_LEVELS:
            raise ConfigError(f"unknown mix {self.mix!r}; choices: {', '.join(MIX_LEVELS)}", field="mix")
        if self.mix_layers <= 0 or self.mix_router_steps < 0:
            bad = "mix_layers" if self.mix_layers <= 0 else "mix_router_steps"
            raise ConfigError(f"{bad} must be {'positive' if bad == 'mix_layers' else '>= 0'}, got "
                              f"{getattr(self, bad)}", field=bad)


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
    """Whether a checkpoint tensor is an attention or MLP weight matrix (what similarity compares)."""
    return len(shape) == 2 and name.endswith(".weight") and bool(ATTN_MLP.search(name))


def similarity_matrix(groups: Iterable[Sequence[torch.Tensor]], n: int) -> list[list[float]]:
    """Pairwise mean per-column cosine of n models: `groups` yields, matrix by matrix, the n models' versions of
    one weight matrix (a generator keeps one matrix of each model in memory at a time)."""
    sums = [[0.0] * n for _ in range(n)]
    count = 0
    for ws in groups:
        if len(ws) != n:
            raise ConfigError(f"a similarity group has {len(ws)} tensors for {n} models")
        for i in range(n):
            for j in range(i + 1, n):
                sums[i][j] += column_cosine(ws[i], ws[j])
        count += 1
        del ws
    sim = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            sim[i][j] = sim[j][i] = sums[i][j] / max(1, count)
    return sim


def cluster(sim: Sequence[Sequence[float]], threshold: float = GlueConfig.threshold,
            architectures: Sequence[str] | None = None) -> list[list[int]]:
    """Families: each model joins the first family (same architecture) whose first member is > threshold similar."""
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}", field="threshold")
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
Scorer = Callable[[dict[int, float]], float]  # merge coefficients by member index -> validation score


@dataclass
class Selection:
    """What one heuristic chose: merge coefficients by member index, their score, and why (steps)."""

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
                       grid: Sequence[float] = GlueConfig.coefficient_grid) -> Selection:
    """Like Average, but the newcomer's coefficient c (the merge keeps 1-c) is searched on a grid."""
    def cands(cur, j):
        return [{**{i: w * (1 - c) for i, w in cur.items()}, j: c} for c in grid]

    return _greedy(order, scorer, cands, "coefficient")


def similarity_selection(best: int, sim: Sequence[Sequence[float]], members: Sequence[int], scorer: Scorer,
                         most_similar_first: bool = True) -> Selection:
    """Average-style greedy merging in order of similarity to the best single model."""
    rest = sorted((i for i in members if i != best), key=lambda i: sim[best][i], reverse=most_similar_first)
    sel = _greedy([best, *rest], scorer, _average_candidates, "similarity")
    return sel


def cmaes_search(members: Sequence[int], scorer: Scorer, trials: int = GlueConfig.trials,
                 sigma0: float = GlueConfig.sigma0, seed: int = GlueConfig.seed, popsize: int | None = None,
                 x0: Sequence[float] | None = None) -> Selection:
    """CMA-ES over the merge weights of `members` (start: uniform), maximizing the validation score."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma warns when matplotlib (plots only) is missing
        import cma

    n = len(members)
    if trials <= 0:
        raise ConfigError(f"trials must be positive, got {trials}", field="trials")
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


# ---------------------------------------------------------------- the whole selection
def select(heuristic: str, order: Sequence[int], sim: Sequence[Sequence[float]], scorer: Scorer,
           config: GlueConfig, family: Sequence[int] | None = None) -> Selection:
    """Run one heuristic on a family: `order` is its members best-first, `family` in their original order."""
    if heuristic == "average":
        return greedy_average(order, scorer)
    if heuristic == "coefficient":
        return greedy_coefficient(order, scorer, config.coefficient_grid)
    if heuristic == "similarity":
        return similarity_selection(order[0], sim, order if family is None else family, scorer)
    if heuristic == "cmaes":
        return cmaes_search(order, scorer, trials=config.trials, sigma0=config.sigma0, seed=config.seed)
    raise ConfigError(f"unknown heuristic {heuristic!r}; choices: {', '.join(HEURISTICS)}", field="heuristics")


def search(sim: Sequence[Sequence[float]], scorer: Scorer, names: Sequence[str],
           architectures: Sequence[str] | None = None, config: GlueConfig | None = None,
           log: Callable[[str], None] | None = None) -> dict:
    """Families from `sim`, each member scored alone, every heuristic of `config` on the largest family (ties: the
    one with the best member), and the best heuristic by validation score: the Model-GLUE report."""
    config = config or GlueConfig()
    log = log or (lambda _: None)
    fams = cluster(sim, config.threshold, architectures)
    scorer = scorer if isinstance(scorer, CachedScorer) else CachedScorer(scorer)
    log("individual scores")
    single = {i: scorer({i: 1.0}) for i in range(len(names))}
    fam = max(fams, key=lambda f: (len(f), max(single[i] for i in f)))
    order = sorted(fam, key=lambda i: single[i], reverse=True)
    before = scorer.calls
    merge_all = {i: 1.0 / len(fam) for i in fam}
    all_score = scorer(merge_all)
    results = {}
    for h in config.heuristics:
        log(h)
        c0, r0 = scorer.calls, scorer.requests
        sel = select(h, order, sim, scorer, config, family=fam)
        sel.evaluations = scorer.requests - r0  # merges scored by this heuristic (cached ones included)
        results[h] = sel.to_dict(names)
        results[h]["new_evaluations"] = scorer.calls - c0
    return {
        "members": [{"name": names[i], "validation_score": single[i],
                     "family": next(k for k, f in enumerate(fams) if i in f)} for i in range(len(names))],
        "similarity": {"on": config.on, "matrix": [list(r) for r in sim]}, "threshold": config.threshold,
        "families": [[names[i] for i in f] for f in fams], "merged_family": [names[i] for i in fam],
        "merge_all": {"weights": {names[i]: w for i, w in merge_all.items()}, "score": all_score},
        "heuristics": results, "best": best_heuristic(results), "evaluations": scorer.calls,
        "scored_before_heuristics": before,
    }


def best_heuristic(results: dict[str, dict]) -> str | None:
    """The heuristic whose selection scored highest on validation (the first one on a tie); None when none ran."""
    return max(results, key=lambda h: results[h]["score"]) if results else None
