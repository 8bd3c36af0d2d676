"""select_subset: choose a subset of a task's training pool with SHED or a baseline; write it as a JSONL data file.

The subset file holds one chosen example per line in the form `patchlm train --task FILE.jsonl` reads (see
data/local.py): classification as `text` + `label` (the label's name), chat as `messages`, question answering as
`question` + `answer`, plain text as `text`; plus `pool_index` (its position in the pool), and where the
selector has them `cluster` and `value`. A report of the values goes beside it (FILE.report.json). SHED's
Shapley loop checkpoints after every round into FILE.jsonl.state/ and resumes from there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from patchlm.data.task import Task
from patchlm.errors import ConfigError, DataError, OutputExistsError, TrainingInterrupted
from patchlm.models import load_base
from patchlm.paths import atomic_write_text
from patchlm.select.baselines import (
    example_perplexities,
    kcenter_greedy,
    knn_shapley_values,
    perplexity_select,
    random_select,
)
from patchlm.select.config import SelectConfig
from patchlm.select.embed import Embedder, content_key, embedding_text
from patchlm.select.shed import Stopped, cluster, group_leave_out, members_by_distance, qocs, qwcs
from patchlm.select.utility import make_utility
from patchlm.train.checkpoint import load_state, save_state
from patchlm.train.engine import StopRequest

NEEDS_BASE = {"perplexity"}
NEEDS_LABELS = {"knn-shapley"}
NEEDS_VALIDATION = {"shed", "knn-shapley"}
STATE_NAME = "shapley"


@dataclass
class Selection:
    """The chosen pool positions, each one's cluster and value (None where the selector has none), a report."""

    task: Task
    method: str
    indices: list[int]
    clusters: list[int | None]
    values: list[float | None]
    report: dict = field(default_factory=dict)

    @property
    def examples(self) -> list[dict]:
        return [self.task.train[i] for i in self.indices]


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".state")


def check_selection(task: Task, cfg: SelectConfig) -> int:
    """Every check that needs the task but no model: the budget, clusters, validation data, labels. Returns the
    budget (examples to select)."""
    n = len(task.train)
    if n == 0:
        raise DataError(f"task {task.name} has an empty training split: nothing to select from")
    budget = n if cfg.method == "full" else cfg.budget(n)
    if cfg.method == "shed" and cfg.clusters > n:
        raise ConfigError(f"clusters ({cfg.clusters}) must not exceed the training pool ({n} examples)",
                          field="clusters")
    if cfg.method in NEEDS_VALIDATION and not task.validation:
        raise DataError(f"task {task.name} has an empty validation split: {cfg.method} scores on it")
    labelled = task.kind == "classification"
    if cfg.method in NEEDS_LABELS and not labelled:
        raise ConfigError(f"{cfg.method} needs labels; task {task.name} is {task.kind}", field="method")
    if cfg.method == "shed" and cfg.utility == "probe" and not labelled:
        raise ConfigError(f"the probe utility needs labels; task {task.name} is {task.kind}: use utility lora or "
                          "coverage", field="utility")
    return budget


def _request(task: Task, cfg: SelectConfig, base) -> dict:
    """What a SHED run was asked for: a resumed run must ask for the same."""
    keys = ["clusters", "permutations", "group_size", "seed", "utility", "embedder", "embed_max_length", "val_limit"]
    if cfg.utility == "lora":
        keys += ["lora_rank", "lora_epochs", "lora_lr", "batch_size", "max_length", "bf16"]
    req = {k: getattr(cfg, k) for k in keys}
    req["task"] = task.name
    req["pool"] = content_key([json.dumps(e, sort_keys=True) for e in task.train], "pool", 0)
    if cfg.utility == "lora":
        req["model"] = base.fingerprint
    return req


def _check_request(saved: dict, mine: dict, where: Path) -> None:
    for k, v in mine.items():
        if saved.get(k) != v:
            what = {"pool": "training pool", "model": "base model (weight fingerprint)"}.get(k, k)
            raise ConfigError(f"cannot resume the selection in {where}: it was started with another {what} "
                              f"({saved.get(k)!r}, now {v!r}); use the same settings, or force to start over",
                              field=k if k not in ("task", "pool", "model") else None)


def _tensor_state(state: dict) -> dict:
    out = dict(state)
    out["contributions"] = torch.from_numpy(np.asarray(state["contributions"], dtype=np.float64))
    return out


def select_subset(task: Task, cfg: SelectConfig | None = None, *, base=None, state_dir: str | Path | None = None,
                  resume: bool = False, log: Callable[[str], None] | None = None) -> Selection:
    """Choose cfg.method's subset of task.train. `base` (a loaded Base) is used by the lora utility and perplexity
    (else cfg.model is loaded when needed). With state_dir, SHED checkpoints every round there; resume continues."""
    cfg = cfg or SelectConfig()
    log = log or (lambda msg: None)
    budget = check_selection(task, cfg)
    n = len(task.train)
    t0 = time.perf_counter()
    report: dict = {"task": task.name, "kind": task.kind, "method": cfg.method, "pool": n, "budget": budget,
                    "config": cfg.to_dict()}
    needs_base = cfg.method in NEEDS_BASE or (cfg.method == "shed" and cfg.utility == "lora")
    if needs_base and base is None:
        base = load_base(cfg.model)
    if needs_base:
        report["base"] = base.ref()
    embedder = Embedder(cfg.embedder, cfg.embed_batch_size, cfg.embed_max_length, cfg.progress)
    val = task.validation[: cfg.val_limit]

    def pool_embeddings() -> np.ndarray:
        te = time.perf_counter()
        emb = embedder.embed([embedding_text(task, e) for e in task.train]).numpy()
        report["embed_seconds"] = time.perf_counter() - te
        return emb

    clusters: list[int | None] = []
    values: list[float | None] = []
    if cfg.method == "random":
        idx = random_select(n, budget, cfg.seed)
    elif cfg.method == "full":
        idx = list(range(n))
    elif cfg.method == "perplexity":
        ppl = example_perplexities(base.model, base.tokenizer, task, task.train, cfg.batch_size, cfg.max_length,
                                   cfg.bf16, cfg.progress)
        idx = perplexity_select(ppl, budget, cfg.perplexity_keep)
        values = [float(ppl[i]) for i in idx]
        report["value"] = "perplexity under the base model"
    elif cfg.method == "kcenter":
        idx, gaps = kcenter_greedy(pool_embeddings(), budget, cfg.seed)
        values = [None if not np.isfinite(g) else float(g) for g in gaps]
        report["value"] = "distance to the earlier centres when chosen"
    elif cfg.method == "knn-shapley":
        emb = pool_embeddings()
        val_emb = embedder.embed([embedding_text(task, e) for e in val]).numpy()
        sv = knn_shapley_values(emb, np.array([int(e["label"]) for e in task.train]), val_emb,
                                np.array([int(e["label"]) for e in val]), cfg.knn_k)
        idx = [int(i) for i in np.argsort(-sv, kind="stable")[:budget]]
        values = [float(sv[i]) for i in idx]
        report["value"] = f"KNN-Shapley value (K={cfg.knn_k}, mean over {len(val)} validation examples)"
    else:
        idx, clusters, values = _shed(task, cfg, base, budget, pool_embeddings(), embedder, val, report, state_dir,
                                      resume, log)
    report["seconds"] = time.perf_counter() - t0
    report["selected"] = len(idx)
    return Selection(task=task, method=cfg.method, indices=list(idx), clusters=clusters or [None] * len(idx),
                     values=values or [None] * len(idx), report=report)


def _shed(task, cfg, base, budget, emb, embedder, val, report, state_dir, resume, log):
    """Clusters, proxies, the Shapley loop (checkpointed), then QOCS or QWCS."""
    val_emb = embedder.embed([embedding_text(task, e) for e in val]).numpy()
    tc = time.perf_counter()
    assign, centroids = cluster(emb, cfg.clusters, cfg.seed)
    members = members_by_distance(emb, assign, centroids)
    proxy_idx = [m[0] for m in members]
    report["cluster_seconds"] = time.perf_counter() - tc
    utility = make_utility(cfg.utility, task=task, cfg=cfg, proxy_idx=proxy_idx, pool_emb=emb, val_emb=val_emb,
                           base=base)
    state, save = None, None
    if state_dir is not None:
        state_dir = Path(state_dir)
        request = _request(task, cfg, base)
        if resume and (state_dir / f"{STATE_NAME}.json").exists():
            saved = load_state(state_dir, STATE_NAME)
            _check_request(saved.get("request", {}), request, state_dir)
            state = saved["state"]
            log(f"resuming the Shapley estimate at permutation {state['perm'] + 1}, round {state['round'] + 1}")

        def save(s: dict) -> None:
            save_state(state_dir, STATE_NAME, {"request": request, "state": _tensor_state(s)})

    tu = time.perf_counter()
    try:
        with StopRequest() as stop:
            est = group_leave_out(len(proxy_idx), utility, cfg.permutations, cfg.group_size, cfg.seed,
                                  empty_utility=utility.empty, state=state, checkpoint=save, stop=stop,
                                  progress=cfg.progress)
    except (Stopped, TrainingInterrupted) as e:
        where = (f"checkpoint in {state_dir}; the same command with --resume continues" if state_dir is not None
                 else "nothing was saved")
        code = getattr(e, "exit_code", None) or stop.exit_code
        raise TrainingInterrupted(f"selection interrupted: {where}", exit_code=code) from e
    report["utility_seconds"] = time.perf_counter() - tu
    if cfg.sampler == "qocs":
        pairs = qocs(est.values, members, budget)
    else:
        pairs = qwcs(est.values, members, budget, cfg.beta, cfg.seed)
    stderr = [None if not np.isfinite(s) else float(s) for s in est.stderr]
    report.update({
        "value": f"the cluster proxy's Shapley value ({cfg.utility} utility)",
        "u_full": est.u_full, "u_empty": est.u_empty, "evaluations": est.evaluations,
        "clusters": [{"cluster": c, "size": len(members[c]), "proxy": proxy_idx[c], "value": float(est.values[c]),
                      "stderr": stderr[c]} for c in range(len(members))],
        "rounds": est.rounds,
    })
    idx = [i for i, _ in pairs]
    return idx, [c for _, c in pairs], [float(est.values[c]) for _, c in pairs]


def subset_row(task: Task, example: dict) -> dict:
    """One example in the form data/local.py reads back as the same kind of task."""
    if task.kind == "classification":
        return {"text": example["text"], "label": task.labels[int(example["label"])]}
    if task.kind == "chat":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in example["messages"]]}
    if task.kind == "qa":
        return {"question": example["question"], "answer": example["answer"]}
    return {"text": example["text"]}


def write_subset(sel: Selection, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write the subset JSONL and its report (each through a temporary name and a rename)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    lines = []
    for i, c, v in zip(sel.indices, sel.clusters, sel.values):
        row = {**subset_row(sel.task, sel.task.train[i]), "pool_index": int(i)}
        if c is not None:
            row["cluster"] = int(c)
        if v is not None:
            row["value"] = float(v)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    rp = report_path(out)
    atomic_write_text(rp, json.dumps(sel.report, indent=1, default=str) + "\n", mode=0o644)
    atomic_write_text(out, "".join(lines), mode=0o644)
    return out, rp


def run_selection(task: Task, cfg: SelectConfig, out: str | Path, *, base=None, resume: bool = False,
                  force: bool = False, log: Callable[[str], None] | None = None) -> tuple[Selection, Path, Path]:
    """The `patchlm select` pipeline: checks, then select (SHED checkpointing beside OUT), write, clean up."""
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"the subset file must end in .jsonl (patchlm train --task reads it), got {out}")
    check_selection(task, cfg)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    sd = state_path(out)
    if sd.exists() and not resume:
        if not force:
            raise OutputExistsError(f"an interrupted selection is in {sd}: pass --resume to continue it or --force to "
                                    "start over")
        shutil.rmtree(sd)
    sel = select_subset(task, cfg, base=base, state_dir=sd, resume=resume, log=log)
    paths = write_subset(sel, out, force=True)
    shutil.rmtree(sd, ignore_errors=True)
    return sel, *paths
