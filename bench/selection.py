"""Data selection study (issue 17): SHED against the common selectors, on clean and noisy pools and on chat data.

    python bench/selection.py                         # everything (tens of CPU hours on 2 cores: rows are cached)
    python bench/selection.py --rows 'select/*'       # only the selections: subsets, noise rates, times, probes
    python bench/selection.py --rows 'train/smollm2-135m/rotten_tomatoes*'    # chosen training rows (fnmatch)
    python bench/selection.py --quick                 # smoke run on tiny-random-llama and small pools

Pools: the training splits of rotten_tomatoes and tweet_sentiment, each as is and with 30% of the labels flipped
to another label at random (the flipped positions are recorded, so every subset has a noise rate), and sharegpt.
Validation data (SHED's utility, knn-shapley) and test data stay clean. Every selector takes 10% of a pool
(SelectConfig's fraction); each subset trains the same LoRA recipe for equal epochs over its own data and, in a
second row, for the full pool's number of steps; on smollm2-135m (which also chose the subsets of the lora
utility and of perplexity filtering) and on gemma3-270m (transfer). Classification rows report test accuracy,
sharegpt rows the perplexity of the assistant tokens of held-out conversations. `probe_accuracy` is a cheap
stand-in measured without any LM training: a logistic regression on the subset's minilm embeddings, scored on the
test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowCache, md_table, write_results

# test: 1,000 examples (all of rotten_tomatoes' 1,275 would add little): a binomial standard error of ~1.1 points at
# 85% accuracy, so the goals' 2-point margins are not lost in the test's own noise (200 gave ~2.5 points).
# SHED at the paper's ratio of pool to clusters (about 25 examples a cluster: QOCS then takes ~10% of the clusters,
# not 10 big ones), with 10 removal rounds per permutation as SelectConfig's defaults have
FULL_SCALE = {"model": "smollm2-135m", "transfer": "gemma3-270m", "max_examples": None, "chat_examples": None,
              "test": 1000, "chat_test": 200, "select": {"clusters": 300, "group_size": 30}}
QUICK_SCALE = {"model": "tiny-random-llama", "transfer": "tiny-random-llama", "max_examples": 400,
               "chat_examples": 160, "test": 16, "chat_test": 16,
               "select": {"clusters": 8, "permutations": 2, "group_size": 4, "val_limit": 16, "max_length": 64}}
POOLS = {"rotten_tomatoes": ("rotten_tomatoes", 0.0), "rotten_tomatoes-noisy30": ("rotten_tomatoes", 0.3),
         "tweet_sentiment": ("tweet_sentiment", 0.0), "tweet_sentiment-noisy30": ("tweet_sentiment", 0.3),
         "sharegpt": ("sharegpt", 0.0)}
SELECTORS = {"full": {"method": "full"}, "random": {"method": "random"}, "perplexity": {"method": "perplexity"},
             "kcenter": {"method": "kcenter"}, "knn-shapley": {"method": "knn-shapley"},
             "shed-lora": {"method": "shed", "utility": "lora"}, "shed-probe": {"method": "shed", "utility": "probe"},
             "shed-coverage": {"method": "shed", "utility": "coverage"}}
CHAT_ONLY, LABELS_ONLY = {"shed-coverage"}, {"knn-shapley", "shed-probe"}
# the training recipe every subset gets (LoRA r 8 on all linear layers, LoRA's other defaults)
RECIPE = {"epochs": 1.0, "batch_size": 8, "lr": 5e-4, "max_length": 128, "chat_max_length": 256, "rank": 8}
NOISE_SEED = 1234
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# measured or extrapolated single-row CPU minutes on this machine (2 cores, bf16 autocast), for the pending list
MINUTES = {"select/shed-lora": 60, "select/perplexity": 10, "train/full": 20, "train/steps": 20, "train/epochs": 3}


def selectors_for(pool: str) -> list[str]:
    chat = POOLS[pool][0] == "sharegpt"
    return [s for s in SELECTORS if not (chat and s in LABELS_ONLY) and not (not chat and s in CHAT_ONLY)]


# ---------------------------------------------------------------- pools
_TASKS: dict = {}


def pool_task(pool: str, sc: dict):
    """The pool's task (labels flipped for the noisy pools) and the set of flipped training positions."""
    if pool in _TASKS:
        return _TASKS[pool]
    from patchlm.data import load_task

    name, noise = POOLS[pool]
    cap = sc["chat_examples"] if name == "sharegpt" else sc["max_examples"]
    task = load_task(name, max_examples=cap)
    flipped: set[int] = set()
    if noise:
        rng = random.Random(NOISE_SEED)
        flipped = set(rng.sample(range(len(task.train)), round(noise * len(task.train))))
        k = len(task.labels)
        train = [dict(e, label=(e["label"] + rng.randrange(1, k)) % k) if i in flipped else e
                 for i, e in enumerate(task.train)]
        task = dataclasses.replace(task, train=train)
    _TASKS[pool] = (task, flipped)
    return task, flipped


_BASES: dict = {}


def base_for(name: str):
    from patchlm.models import load_base

    if name not in _BASES:
        _BASES.clear()  # one model in memory at a time
        _BASES[name] = load_base(name)
    return _BASES[name]


# ---------------------------------------------------------------- selection rows
def select_row(cache: RowCache, sc: dict, pool: str, selector: str) -> dict:
    def run():
        from patchlm.select import SelectConfig, select_subset

        task, flipped = pool_task(pool, sc)
        cfg = SelectConfig(**SELECTORS[selector], **sc["select"], model=sc["model"], bf16=True, progress=False)
        base = base_for(sc["model"]) if selector in ("perplexity", "shed-lora") else None
        t0 = time.perf_counter()
        sel = select_subset(task, cfg, base=base)
        secs = time.perf_counter() - t0
        rep = sel.report
        row = {"indices": sel.indices, "n": len(sel.indices), "selection_seconds": secs,
               "noise_rate": (sum(i in flipped for i in sel.indices) / len(sel.indices)) if flipped else None,
               "pool_noise_rate": len(flipped) / len(task.train) if flipped else None}
        for k in ("u_full", "u_empty", "evaluations", "utility_seconds", "embed_seconds"):
            if k in rep:
                row[k] = rep[k]
        if task.kind == "classification":
            row["probe_accuracy"] = probe_accuracy(task, sel.indices, sc)
        return row

    return cache.run(f"select/{pool}/{selector}", run)


def probe_accuracy(task, indices: list[int], sc: dict) -> float:
    """Test accuracy of a logistic regression on the subset's embeddings (its labels as given, noise included)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from patchlm.select import SelectConfig
    from patchlm.select.embed import Embedder, embedding_text

    c = SelectConfig()
    emb = Embedder(c.embedder, c.embed_batch_size, c.embed_max_length)
    x = emb.embed([embedding_text(task, e) for e in task.train]).numpy()[indices]
    y = np.array([task.train[i]["label"] for i in indices])
    test = task.test[: sc["test"]]
    tx = emb.embed([embedding_text(task, e) for e in test]).numpy()
    ty = np.array([e["label"] for e in test])
    if len(set(y.tolist())) < 2:
        return float((ty == y[0]).mean())
    return float((LogisticRegression(max_iter=1000, random_state=0).fit(x, y).predict(tx) == ty).mean())


# ---------------------------------------------------------------- training rows
def chat_perplexity(base, task, limit: int, max_length: int) -> float:
    """exp(mean loss) over the assistant tokens of the first `limit` test conversations."""
    import torch

    from patchlm.data.features import build_features, collate, pad_id
    from patchlm.models.parts import autocast, model_device
    from patchlm.train.engine import causal_lm_loss, to_device

    feats = build_features(task, "test", base.tokenizer, "chat", max_length, limit=limit)
    dev = model_device(base.model)
    base.model.eval()
    tot, n = 0.0, 0
    with torch.no_grad(), autocast(dev, True):
        for s in range(0, len(feats), 8):
            loss, k = causal_lm_loss(base.model, to_device(collate(feats[s: s + 8], pad_id(base.tokenizer)), dev))
            tot, n = tot + float(loss) * k, n + k
    return math.exp(tot / n)


def train_row(cache: RowCache, sc: dict, model: str, pool: str, selector: str, budget: str) -> dict:
    def run():
        from patchlm.evaluate import evaluate
        from patchlm.train import TrainConfig, Trainer

        task, _ = pool_task(pool, sc)
        sel = select_row(cache, sc, pool, selector)
        chat = task.kind == "chat"
        sub = dataclasses.replace(task, train=[task.train[i] for i in sel["indices"]], validation=[])
        n = len(task.train) if budget == "steps" else len(sub.train)
        steps = max(1, math.ceil(RECIPE["epochs"] * n / RECIPE["batch_size"]))
        max_len = RECIPE["chat_max_length"] if chat else RECIPE["max_length"]
        base = base_for(model)
        if chat and not getattr(base.tokenizer, "chat_template", None):
            base.tokenizer.chat_template = CHATML  # gemma3-270m (base) ships none
        cfg = TrainConfig(steps=steps, batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], max_length=max_len,
                          bf16=True, progress=False, seed=0)
        t0 = time.perf_counter()
        trainer = Trainer(base, "lora", {"r": RECIPE["rank"]}, sub, cfg)
        trainer.run()
        secs = time.perf_counter() - t0
        if chat:
            metric = {"perplexity": chat_perplexity(base, task, sc["chat_test"], max_len)}
        else:
            metric = {"accuracy": evaluate(base.model, base.tokenizer, task, split="test", limit=sc["test"],
                                           bf16=True, max_length=max_len)["accuracy"]}
        trainer.kind.detach(base.model)
        return {**metric, "steps": steps, "train_seconds": secs,
                "test_examples": sc["chat_test"] if chat else sc["test"]}

    return cache.run(f"train/{model}/{pool}/{selector}/{budget}", run)


def zero_shot_row(cache: RowCache, sc: dict, model: str, pool: str) -> dict:
    def run():
        from patchlm.evaluate import evaluate

        task, _ = pool_task(pool, sc)
        base = base_for(model)
        if task.kind == "chat":
            if not getattr(base.tokenizer, "chat_template", None):
                base.tokenizer.chat_template = CHATML
            return {"perplexity": chat_perplexity(base, task, sc["chat_test"], RECIPE["chat_max_length"])}
        return {"accuracy": evaluate(base.model, base.tokenizer, task, split="test", limit=sc["test"], bf16=True,
                                     max_length=RECIPE["max_length"])["accuracy"]}

    return cache.run(f"zeroshot/{model}/{pool}", run)


# ---------------------------------------------------------------- the study
def jobs(sc: dict) -> list[tuple]:
    """Every row of the study in order: ('select', pool, selector), ('zeroshot', model, pool) and
    ('train', model, pool, selector, budget)."""
    out = []
    for pool in POOLS:
        out += [("select", pool, s) for s in selectors_for(pool)]
    for model in dict.fromkeys([sc["model"], sc["transfer"]]):
        for pool in POOLS:
            out.append(("zeroshot", model, pool))
            for s in selectors_for(pool):
                for budget in (("epochs",) if s == "full" else ("epochs", "steps")):
                    out.append(("train", model, pool, s, budget))
    return out


def key(job: tuple) -> str:
    return "/".join(job)


def run_job(cache, sc, job):
    if job[0] == "select":
        return select_row(cache, sc, job[1], job[2])
    if job[0] == "zeroshot":
        return zero_shot_row(cache, sc, job[1], job[2])
    return train_row(cache, sc, *job[1:])


def _pool_scale(pool: str) -> float:
    """Cost of a pass over the pool relative to rotten_tomatoes (pool size; sharegpt's longer examples)."""
    return 3.0 if pool.startswith("tweet") else (4.5 if pool == "sharegpt" else 1.0)


def minutes(job: tuple) -> float:
    if job[0] == "select":
        if job[2] == "perplexity":
            return MINUTES["select/perplexity"] * _pool_scale(job[1])
        return MINUTES.get(f"select/{job[2]}", 2)
    if job[0] == "zeroshot":
        return 1
    pool, selector, budget = job[2], job[3], job[4]
    scale = _pool_scale(pool)
    scale *= 1.5 if job[1] == "gemma3-270m" else 1.0
    kind = "full" if selector == "full" else budget
    return MINUTES[f"train/{kind}"] * scale


def majority_share(pool: str, sc: dict, indices: list[int]) -> float | None:
    """The share of the subset's most common label (as given, flips included): a selector that skews toward one
    class shows here (the pools' own share is in the `full` row)."""
    task, _ = pool_task(pool, sc)
    if task.kind != "classification" or not indices:
        return None
    return Counter(task.train[i]["label"] for i in indices).most_common(1)[0][1] / len(indices)


def table_rows(cache: RowCache, sc: dict) -> list[dict]:
    """One row per (model, pool, selector, budget) and per selection, from whatever is cached."""
    rows = []
    for pool in POOLS:
        for s in selectors_for(pool):
            sel = cache.get(f"select/{pool}/{s}") or {}
            share = majority_share(pool, sc, sel["indices"]) if sel else None
            rows.append({"name": f"select/{pool}/{s}", "kind": "selection", "pool": pool, "selector": s,
                         "model": sc["model"] if s in ("perplexity", "shed-lora") else "minilm-l6",
                         "n": sel.get("n"), "accuracy": None, "perplexity": None,
                         "probe_accuracy": sel.get("probe_accuracy"), "noise_rate": sel.get("noise_rate"),
                         "pool_noise_rate": sel.get("pool_noise_rate"), "majority_share": share,
                         "selection_seconds": sel.get("selection_seconds"), "utility_evaluations":
                         sel.get("evaluations"), "done": bool(sel)})
    for job in jobs(sc):
        if job[0] == "zeroshot":
            r = cache.get(key(job)) or {}
            rows.append({"name": key(job), "kind": "zero-shot", "model": job[1], "pool": job[2], "selector": "none",
                         "accuracy": r.get("accuracy"), "perplexity": r.get("perplexity"), "done": bool(r)})
        elif job[0] == "train":
            _, model, pool, s, budget = job
            r = cache.get(key(job)) or {}
            sel = cache.get(f"select/{pool}/{s}") or {}
            rows.append({"name": key(job), "kind": "training", "model": model, "pool": pool, "selector": s,
                         "budget": budget, "n": sel.get("n"), "steps": r.get("steps"),
                         "accuracy": r.get("accuracy"), "perplexity": r.get("perplexity"),
                         "noise_rate": sel.get("noise_rate"), "selection_seconds": sel.get("selection_seconds"),
                         "train_seconds": r.get("train_seconds"), "done": bool(r)})
    return rows


def goals(rows: list[dict]) -> list[str]:
    """What the finished rows say about the issue's goals (a goal without its rows is 'pending')."""
    out = []
    sel = {(r["pool"], r["selector"]): r for r in rows if r["kind"] == "selection" and r["done"]}
    for pool in POOLS:
        if not pool.endswith("noisy30"):
            continue
        for s in ("shed-lora", "shed-probe"):
            r = sel.get((pool, s))
            if r is None:
                out.append(f"- noise, {pool}, {s}: pending")
                continue
            ok = r["noise_rate"] <= r["pool_noise_rate"] / 2
            out.append(f"- noise, {pool}, {s}: subset noise {r['noise_rate']:.3f} vs pool {r['pool_noise_rate']:.3f}"
                       f" -> goal (at most half) {'met' if ok else 'NOT met'}")
    noisy = {k: r["noise_rate"] for k, r in sel.items() if r["noise_rate"] is not None}
    shed_noise = [(p, x) for (p, s), x in noisy.items() if s.startswith("shed")]
    if shed_noise:
        knn = [f"{p} {x:.3f}" for (p, s), x in noisy.items() if s == "knn-shapley"]
        out.append("- Why SHED's subsets keep the pool's noise: QOCS and QWCS take or leave whole clusters and take a "
                   "cluster's members without looking at their labels, while the noisy pools flip labels "
                   "independently of the text; so every cluster holds about the pool's share of flipped labels, and "
                   "so does any union of clusters (SHED "
                   + ", ".join(f"{p} {x:.3f}" for p, x in shed_noise) + "). A proxy's value can only say whether "
                   "its cluster helps. Filtering label noise that is independent of the text needs a per-example "
                   "score" + (f" (knn-shapley values each example: {', '.join(knn)})" if knn else "") + ".")
    tr = {(r["model"], r["pool"], r["selector"], r["budget"]): r for r in rows if r["kind"] == "training"
          and r["done"]}
    for model in dict.fromkeys(r["model"] for r in rows if r["kind"] == "training"):
        for pool in POOLS:
            metric = "perplexity" if pool == "sharegpt" else "accuracy"
            for budget in ("epochs", "steps"):
                rnd, full = tr.get((model, pool, "random", budget)), tr.get((model, pool, "full", "epochs"))
                for s in ("shed-lora", "shed-probe", "shed-coverage"):
                    if s not in selectors_for(pool):
                        continue
                    shed = tr.get((model, pool, s, budget))
                    if not (shed and rnd):
                        out.append(f"- {s} vs random/full, {model}, {pool}, equal {budget}: pending")
                        continue
                    a, b = shed[metric], rnd[metric]
                    f = full[metric] if full else None
                    if metric == "accuracy":
                        out.append(f"- {model}, {pool}, equal {budget}: {s} {a:.3f}, random {b:.3f}, full "
                                   + (f"{f:.3f}" if full else "pending") + f": beats random by 2 points "
                                   f"{'yes' if a - b >= 0.02 else 'NO'} ({100 * (a - b):+.1f}), matches full "
                                   + (("yes" if a >= f else "NO") if full else "pending"))
                    else:
                        out.append(f"- {model}, {pool}, equal {budget}: perplexity {s} {a:.2f}, random {b:.2f}, "
                                   "full " + (f"{f:.2f}" if full else "pending"))
    return out


def page(rows: list[dict], sc: dict, pending: list[tuple]) -> str:
    from patchlm.select import SelectConfig

    c = SelectConfig(**sc["select"])
    sel_rows = [r for r in rows if r["kind"] == "selection"]
    tr_rows = [r for r in rows if r["kind"] != "selection"]
    lines = []
    if pending:
        hours = sum(minutes(j) for j in pending) / 60
        lines += [f"**Partial results**: {len(rows) - len(pending)} of {len(rows)} rows are measured; the other "
                  f"{len(pending)} (listed at the end, about {hours:.0f} CPU hours on this machine by the estimate "
                  "there) show `-`. The rows are cached: re-running the command continues where it stopped.", ""]
    lines += [f"Selection: {c.fraction:.0%} of each pool (SHED with {c.clusters} KMeans "
              f"clusters on {c.embedder} embeddings, {c.permutations} permutations, groups of {c.group_size}, "
              f"{c.sampler.upper()}, utilities scored on {c.val_limit} clean validation examples; the lora utility "
              f"trains rank {c.lora_rank} for {c.lora_epochs:g} epochs on the proxies of {sc['model']}). "
              f"Training: LoRA rank {RECIPE['rank']}, lr {RECIPE['lr']:g}, batch {RECIPE['batch_size']}, bf16 "
              f"autocast, {RECIPE['epochs']:g} epoch over the subset (`epochs`) or the full pool's step count "
              f"(`steps`); test on the first {sc['test']} test examples (classification) or {sc['chat_test']} "
              "held-out conversations (sharegpt).", "",
              "## Selections (no LM training)", "",
              "`noise_rate`: the share of flipped labels in the subset (the noisy pools hold 30%); `probe_accuracy`: "
              "test accuracy of a logistic regression on the subset's embeddings, a cheap stand-in for the LoRA "
              "rows; `majority_share`: the share of the subset's most common label (the `full` row: the pool's own); "
              "`utility_evaluations`: SHED's utility calls.", "",
              md_table(sel_rows, ["name", "n", "noise_rate", "majority_share", "probe_accuracy", "selection_seconds",
                                  "utility_evaluations"]), "",
              "## Training on the subsets", "",
              md_table(tr_rows, ["name", "n", "steps", "accuracy", "perplexity", "noise_rate", "selection_seconds",
                                 "train_seconds"]), "",
              "## Goals", "", *goals(rows), ""]
    if pending:
        lines += ["## Rows still to run (estimated CPU minutes each)", ""]
        lines += [f"- `{key(j)}`: ~{minutes(j):.0f} min" for j in pending]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, small pools (numbers mean nothing)")
    ap.add_argument("--rows", default="", help="comma-separated fnmatch patterns of row names, e.g. 'select/*'")
    ap.add_argument("--page", action="store_true", help="only rewrite the page from the cached rows")
    a = ap.parse_args()
    sc = QUICK_SCALE if a.quick else FULL_SCALE
    cache = RowCache("select", "quick" if a.quick else "full", committed=True)
    patterns = [p for p in a.rows.split(",") if p]
    todo = [] if a.page else [j for j in jobs(sc) if not patterns or any(fnmatch.fnmatch(key(j), p)
                                                                          for p in patterns)]
    for j in todo:
        t0 = time.perf_counter()
        run_job(cache, sc, j)
        print(f"{key(j)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    pending = [j for j in jobs(sc) if cache.get(key(j)) is None]
    rows = table_rows(cache, sc)
    text = page(rows, sc, pending)
    if a.quick:
        print(text)
        return
    write_results("select", rows, text, extra={"partial": bool(pending), "pending": [key(j) for j in pending]},
                  cmd="python bench/selection.py")  # the rows' command, also when --page or --rows writes it


if __name__ == "__main__":
    main()
