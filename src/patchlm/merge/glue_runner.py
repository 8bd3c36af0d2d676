"""Model-GLUE on a zoo of patches: the I/O around the pure selection in glue.py (streaming the base checkpoint
for similarity, scoring candidate merges by evaluation, building the chosen merge). `patchlm glue` is `run_glue`
followed by `best_merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from patchlm.errors import ConfigError
from patchlm.evaluate import evaluate
from patchlm.merge.glue import GlueConfig, Scorer, is_attn_mlp_weight, search, similarity_matrix
from patchlm.merge.patch_merge import PatchDeltas, check_same_base, merge_patches
from patchlm.models.checkpoint import Checkpoint
from patchlm.patch import Patch, get_kind

GLUE_METHOD = "task_arithmetic"  # a selection's coefficients are task-arithmetic weights (stacked LoRA: exact)


def _config(config: GlueConfig | None, overrides: dict) -> GlueConfig:
    return replace(config or GlueConfig(), **overrides)


def merge_selection(patches: Sequence[Patch], coefs: dict[int, float]) -> Patch:
    """The merge a selection stands for: task arithmetic of the chosen members with their coefficients."""
    idx = sorted(coefs)
    return merge_patches([patches[i] for i in idx], GLUE_METHOD, weights=[coefs[i] for i in idx], force=True)


def patch_scorer(base, patches: Sequence[Patch], tasks, config: GlueConfig | None = None, **overrides) -> Scorer:
    """Score coefficients by the mean accuracy over `tasks` (on config.split) of the merge they stand for."""
    cfg = _config(config, overrides)

    def score(coefs: dict[int, float]) -> float:
        merged = merge_selection(patches, coefs)
        merged.apply(base, force=True)
        try:
            accs = [evaluate(base.model, base.tokenizer, t, split=cfg.split, limit=cfg.limit, bf16=cfg.bf16,
                             max_length=cfg.max_length, batch_size=cfg.batch_size)["accuracy"] for t in tasks]
        finally:
            get_kind(merged.kind).detach(base.model)
        return sum(accs) / len(accs)

    return score


def member_weights(src: Checkpoint, members: Sequence[PatchDeltas], on: str) -> Iterator[list[torch.Tensor]]:
    """Matrix by matrix (attention and MLP weights of the base checkpoint), each member's version of it: the base
    weight plus the member's dW (on="weights"), or the dW alone (on="delta"). One base tensor read at a time."""
    for name, (_, _, shape) in src.meta.items():
        if not is_attn_mlp_weight(name, shape):
            continue
        module = name[: -len(".weight")]
        base_t = src.read(name).float() if on == "weights" else None
        out = []
        for m in members:
            d = m.get(module)
            if on == "delta":
                out.append(d if d is not None else torch.zeros(shape))
            else:
                out.append(base_t + d if d is not None else base_t)
        yield out


def run_glue(base, patches: Sequence[Patch], names: Sequence[str], tasks, config: GlueConfig | None = None, *,
             scorer: Scorer | None = None, log: Callable[[str], None] | None = None, **overrides) -> dict:
    """Similarity, families, and each selection heuristic on a zoo of patches of one base; a report.

    `overrides` replace fields of `config` (e.g. trials=30); `scorer` replaces evaluation (tests, benchmarks)."""
    cfg = _config(config, overrides)
    log = log or (lambda _: None)
    if len(patches) < 2:
        raise ConfigError("a zoo needs at least two patches")
    check_same_base(patches)
    src = Checkpoint(base.path or base.name)
    log("similarity")
    sim = similarity_matrix(member_weights(src, [PatchDeltas(p) for p in patches], cfg.on), len(patches))
    scorer = scorer or patch_scorer(base, patches, tasks, cfg)
    report = search(sim, scorer, names, [p.base.get("architecture") for p in patches], cfg, log=log)
    report.update({"tasks": [t.name for t in tasks], "limit": cfg.limit})
    return report


def best_merge(report: dict, patches: Sequence[Patch], names: Sequence[str]) -> Patch | None:
    """The merged patch of the report's best selection, with what chose it in its metrics (None: nothing ran)."""
    if not report.get("best"):
        return None
    best = report["heuristics"][report["best"]]
    idx = [names.index(n) for n in best["weights"]]
    merged = merge_patches([patches[i] for i in idx], GLUE_METHOD, weights=list(best["weights"].values()))
    merged.metrics["glue"] = {"heuristic": report["best"], "score": best["score"], "weights": best["weights"]}
    return merged


def family_merges(report: dict, patches: Sequence[Patch], names: Sequence[str]) -> tuple[list[Patch], list[dict]]:
    """What `--mix` mixes: one patch per family (the best selection for the family the heuristics ran on, the
    uniform task-arithmetic merge of any other family, a lone member as it is) and why, family by family."""
    best = report["heuristics"][report["best"]] if report.get("best") else None
    out, why = [], []
    for k, fam in enumerate(report["families"]):
        if best is not None and fam == report["merged_family"]:
            keep = [n for n, w in best["weights"].items() if abs(w) > 1e-6]
            weights = {n: best["weights"][n] for n in keep}
            reason = f"the {report['best']} selection (validation {best['score']:.4f})"
        else:
            weights = {n: 1.0 / len(fam) for n in fam}
            reason = "its only member" if len(fam) == 1 else "the uniform merge of its members"
        if len(weights) == 1 and abs(next(iter(weights.values())) - 1.0) < 1e-9:
            out.append(patches[names.index(next(iter(weights)))])
        else:
            idx = [names.index(n) for n in weights]
            out.append(merge_patches([patches[i] for i in idx], GLUE_METHOD, weights=list(weights.values())))
        why.append({"family": k, "members": list(fam), "weights": weights, "merged_as": reason})
    return out, why
