"""Evaluate a routed library on a mixed stream of test inputs from several tasks, unlabeled by task.

Batches mix tasks (ordered by length, as a server would batch them); the router sees only each input's prompt.
Each input is scored by label log-likelihood over its own task's verbalizers (the metric needs the label set,
the router never sees it). Reported: accuracy per task, held-in and held-out means, routing accuracy (the
input's own expert among the top-k by routing mass, held-in inputs), tokens/s of the forward passes, peak memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from patchlm.data.features import collate, encode_prompt, encode_verbalizers, pad_id
from patchlm.errors import ConfigError, DataError
from patchlm.evaluate.probes import MemoryProbe
from patchlm.models.parts import autocast, model_device
from patchlm.route import routed as rt
from patchlm.route.arrow import ArrowModel
from patchlm.route.config import RouteConfig
from patchlm.route.gates import load_gates
from patchlm.route.glider import GlobalRouter
from patchlm.route.library import Library

LOCAL = ("glider", "glider-local", "phatgoose")


@dataclass
class Item:
    """One input of the stream: its task (for scoring only), the example, and the prompt the router sees."""

    task: str
    example: dict
    prompt: str


def mixed_stream(tasks: dict, limit: int | None, split: str = "test") -> list[Item]:
    """The first `limit` examples of each task's split, interleaved round-robin (no task order to exploit)."""
    per = {}
    for name, t in tasks.items():
        if t.kind != "classification":
            raise DataError(f"task {name} is {t.kind}; routing is evaluated on classification tasks")
        ex = t.split(split)[: limit or None]
        if not ex:
            raise DataError(f"task {name} has no examples in split {split}")
        per[name] = [Item(name, e, t.prompt(e)) for e in ex]
    out, i = [], 0
    while any(i < len(v) for v in per.values()):
        out += [v[i] for v in per.values() if i < len(v)]
        i += 1
    return out


def expert_for_task(library: Library) -> dict[str, int]:
    """task name -> index of the library's expert for it (its recorded task, else an expert of that name)."""
    out = {}
    for i, e in enumerate(library.experts):
        out.setdefault(e.task or e.name, i)
    return out


# a router for the stream: given the batch's items, set the routing state (or do nothing)
Prepare = Callable[[list[Item]], None]


@torch.no_grad()
def score_stream(model, tokenizer, tasks: dict, items: list[Item], prepare: Prepare | None, cfg: RouteConfig,
                 state: rt.RouteState | None = None) -> dict:
    """Predictions for every item, the routing mass per item (when a routed state is given), token and time tallies."""
    device = model_device(model)
    verbs = {n: encode_verbalizers(tokenizer, t) for n, t in tasks.items()}
    rows = []  # (item index, ids, verbalizer ids or None for the one-pass single-token case, label index)
    for i, it in enumerate(items):
        vs = verbs[it.task]
        longest = max(len(v) for v in vs)
        ids = encode_prompt(tokenizer, tasks[it.task], it.example, cfg.max_length, reserve=longest)
        if all(len(v) == 1 for v in vs):
            rows.append((i, ids, None, -1))
        else:
            rows += [(i, ids + v, v, j) for j, v in enumerate(vs)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    scores = [torch.full((len(verbs[it.task]),), float("nan")) for it in items]
    mass = [None] * len(items)
    pad = pad_id(tokenizer)
    tokens, seconds = 0, 0.0
    model.eval()
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s: s + cfg.batch_size]
        batch_items = [items[rows[r][0]] for r in idx]
        if prepare is not None:
            prepare(batch_items)
        if state is not None:
            state.mass = None
        b = collate([{"input_ids": rows[r][1]} for r in idx], pad, labels=False)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        t0 = time.perf_counter()
        with autocast(device, cfg.bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        seconds += time.perf_counter() - t0
        tokens += int(mask.sum())
        lp = torch.log_softmax(logits.float(), -1).cpu()
        last = (mask.sum(1) - 1).cpu()
        for j, r in enumerate(idx):
            i, seq, v, lab = rows[r]
            if v is None:
                vids = torch.tensor([x[0] for x in verbs[items[i].task]])
                scores[i] = lp[j, last[j], vids]
            else:
                start = len(seq) - len(v)
                pos = torch.arange(start - 1, start - 1 + len(v))
                scores[i][lab] = lp[j, pos, torch.tensor(v)].sum()
            if state is not None and state.mass is not None and mass[i] is None:
                mass[i] = state.mass[j].clone()
    preds = [int(sc.argmax()) for sc in scores]
    return {"preds": preds, "mass": mass, "tokens": tokens, "seconds": seconds}


def summarize(items: list[Item], preds: list[int], held_in: set[str], mass=None, right: dict | None = None,
              top_k: int = 2) -> dict:
    """Accuracy per task, held-in / held-out means, routing accuracy (right expert in the top-k by mass)."""
    acc: dict[str, list[int]] = {}
    for it, p in zip(items, preds):
        acc.setdefault(it.task, []).append(int(p == int(it.example["label"])))
    per = {t: sum(v) / len(v) for t, v in acc.items()}
    ins = [per[t] for t in per if t in held_in]
    outs = [per[t] for t in per if t not in held_in]
    out = {**{f"acc_{t}": a for t, a in per.items()},
           "held_in_mean": sum(ins) / len(ins) if ins else None,
           "held_out_mean": sum(outs) / len(outs) if outs else None, "routing_accuracy": None}
    if mass is not None and right is not None:
        hits = []
        for it, m in zip(items, mass):
            if it.task in right and m is not None and float(m.sum()) > 0:
                k = min(top_k, m.numel())
                hits.append(int(right[it.task] in m.topk(k).indices.tolist()))
        out["routing_accuracy"] = sum(hits) / len(hits) if hits else None
    return out


def one_hot(n: int, e: int | None) -> torch.Tensor:
    w = torch.zeros(n)
    if e is not None:
        w[e] = 1.0
    return w


def evaluate_router(base, library: Library, tasks: dict, config: RouteConfig | None = None, *,
                    merged=None, expert: str | None = None, gates_path=None, log=None) -> dict:
    """One router on the mixed stream of `tasks` (name -> Task); returns the row (metrics and timings).

    merged: the merged-library Patch (router "merged"); expert: the single expert of router "best" (else the best
    on the validation stream is chosen here)."""
    cfg = config or RouteConfig()
    library.require_experts()
    library.check_base(base)
    n = len(library.experts)
    if cfg.top_k > n:
        raise ConfigError(f"top_k {cfg.top_k} is larger than the library's {n} experts", field="top_k")
    right = expert_for_task(library)
    held_in = {t for t in tasks if t in right}
    items = mixed_stream(tasks, cfg.limit)
    row = {"router": cfg.router, "top_k": cfg.top_k, "level": cfg.level, "experts": n, "inputs": len(items)}
    r = cfg.router
    if r == "glider" or r == "glider-global":
        library.require_global_inputs()  # before any model work
    if r == "merged" and merged is None:
        raise ConfigError("the merged baseline needs the merged library patch", field="router")
    t_route = time.perf_counter()
    with MemoryProbe() as mem:
        if r in ("base", "merged"):
            if r == "merged":
                merged.apply(base)
            try:
                res = score_stream(base.model, base.tokenizer, tasks, items, None, cfg)
            finally:
                if r == "merged":
                    from patchlm.patch import get_kind

                    get_kind(merged.kind).detach(base.model)
            mass = None
        elif r == "arrow":
            # PEFT 0.21's Arrow scatter fails under bf16 autocast (score dtype != top-k dtype): it runs in fp32
            acfg = dataclasses.replace(cfg, bf16=False)
            row["bf16"] = False
            with ArrowModel(base, library.names, library.patches(), acfg) as model:
                res = score_stream(model, base.tokenizer, tasks, items, None, acfg)
            mass = None
        else:
            state = rt.install(base.model, library.patches(), top_k=cfg.top_k, level=cfg.level,
                               dispatch=cfg.dispatch)
            try:
                prepare = _prepare(r, base, library, tasks, cfg, state, right, expert, gates_path, row, log)
                res = score_stream(base.model, base.tokenizer, tasks, items, prepare, cfg, state=state)
                row["expert_calls"] = list(state.calls)
            finally:
                rt.remove(base.model)
            mass = res["mass"]
    row.update(summarize(items, res["preds"], held_in, mass, right, cfg.top_k))
    row.update({"tokens": res["tokens"], "forward_seconds": res["seconds"],
                "tokens_per_s": res["tokens"] / res["seconds"] if res["seconds"] else None,
                "total_seconds": time.perf_counter() - t_route, "peak_rss_mib": mem.peak_bytes / 2**20})
    return row


def _prepare(r: str, base, library: Library, tasks: dict, cfg: RouteConfig, state: rt.RouteState, right: dict,
             expert: str | None, gates_path, row: dict, log) -> Prepare:
    """The per-batch routing of the routers that run on the routed model."""
    n = state.num_experts
    if r in LOCAL:
        load_gates(base.model, library, gates_path)
    if r in ("glider", "glider-global"):
        glob = GlobalRouter(base, library, cfg, state=state)
        row["expert_instructions"] = glob.expert_instructions

        def prep(batch: list[Item]) -> None:
            b = glob.bias([it.prompt for it in batch])
            if r == "glider":
                state.weights, state.bias = None, b
            else:
                state.weights, state.bias = rt.topk_weights(b, cfg.top_k), None

        return prep
    if r in ("glider-local", "phatgoose"):
        def local(batch: list[Item]) -> None:
            state.weights, state.bias = None, None

        return local
    if r == "uniform":
        w = torch.full((n,), 1.0 / n)
        return lambda batch: setattr(state, "weights", w.expand(len(batch), n))
    if r == "oracle":
        return lambda batch: setattr(state, "weights", torch.stack([one_hot(n, right.get(it.task)) for it in batch]))
    if r == "best":
        e = library.names.index(library.expert(expert).name) if expert else _best_expert(base, library, tasks, cfg,
                                                                                         state, right, log)
        row["best_expert"] = library.names[e]
        w = one_hot(n, e)
        return lambda batch: setattr(state, "weights", w.expand(len(batch), n))
    raise ConfigError(f"router {r} does not run on the routed model", field="router")


def _best_expert(base, library: Library, tasks: dict, cfg: RouteConfig, state: rt.RouteState, right: dict,
                 log) -> int:
    """The expert with the best held-in mean on a validation stream (half the test limit per task)."""
    held = {t: tasks[t] for t in tasks if t in right} or tasks
    val = mixed_stream(held, max(1, (cfg.limit or 100) // 2), split="validation")
    best, best_acc = 0, -1.0
    for e in range(state.num_experts):
        w = one_hot(state.num_experts, e)
        res = score_stream(base.model, base.tokenizer, held, val,
                           lambda batch, w=w: setattr(state, "weights", w.expand(len(batch), -1)), cfg)
        acc = summarize(val, res["preds"], set(held))["held_in_mean"] or 0.0
        if log:
            log(f"best: expert {library.names[e]} validation held-in mean {acc:.3f}")
        if acc > best_acc:
            best, best_acc = e, acc
    state.reset_counts()
    return best
