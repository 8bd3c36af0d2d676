"""Zeroth-order fine-tuning study (ZO-Bench at our scale): optimizers x schemes, enhancements, memory, speed.

    python bench/zo.py                       # every phase (many hours on 2 cores: rows are cached, it resumes)
    python bench/zo.py --phase memory        # peak memory of fresh processes, every optimizer, full and LoRA
    python bench/zo.py --phase speed         # a ZO step against a forward pass of the same batch
    python bench/zo.py --phase accuracy --rows zo-sgd/lora,adamw/lora   # chosen rows only
    python bench/zo.py --quick               # smoke run on the tiny test model (numbers mean nothing)

Rows train on smollm2-135m with the same data order (the trainer's order is a function of the seed), bf16
autocast, batch 8, and evaluate on the first 200 test examples of rotten_tomatoes and sms_spam. Learning rate
(and eps for ZO rows) are chosen per row by a small search on 100 validation examples after a short run; every
point of the search is on the page. The enhancements (block-wise, hybrid, sparse) are rows over plain ZO-SGD on
LoRA at an equal number of forward passes. Memory: each (optimizer, scheme) trains a few steps in a fresh
process and reports its peak resident memory, next to a fresh process that only evaluates the same loss on
the same batch (pure inference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowCache, md_table, write_results

MODEL = "smollm2-135m"
TASKS = ["rotten_tomatoes", "sms_spam"]
OPTIMIZERS = ["zo-sgd", "zo-sgd-sign", "zo-sgd-mmt", "zo-sgd-cons", "zo-adam", "forward-grad", "sgd", "adamw"]
SCHEMES = {"lora": ("lora", {"r": 8, "targets": "all-linear"}), "full": ("full", {}),
           "prefix": ("prefix", {}), "prompt": ("prompt", {})}
FO = ("sgd", "adamw")
# learning-rate grids per (first/zeroth order, scheme): ZO needs rates orders of magnitude below first order
LR_GRID = {("zo", "lora"): [1e-4, 1e-3, 1e-2], ("zo", "full"): [1e-7, 1e-6, 1e-5],
           ("zo", "prefix"): [1e-3, 1e-2, 1e-1], ("zo", "prompt"): [1e-3, 1e-2, 1e-1],
           ("fo", "lora"): [5e-4, 2e-3], ("fo", "full"): [1e-5, 1e-4], ("fo", "prefix"): [1e-3, 1e-2],
           ("fo", "prompt"): [1e-3, 1e-2]}
SGD_SCALE = 20.0  # plain SGD takes rates ~20x AdamW's here
EPS_GRID = [1e-2, 1e-4]  # tried around the default 1e-3 at the row's best rate
ENHANCEMENTS = {  # name -> TrainConfig overrides over plain zo-sgd on LoRA, and the forward passes per step
    "zo-sgd-block/lora": ({"zo_block": "layer"}, 2),
    "zo-sgd-sparse/lora": ({"zo_sparsity": 0.1, "zo_sparse_mode": "magnitude"}, 2),
    "zo-sgd-hybrid/lora": ({"zo_fo_layers": "LAST4"}, 3),  # the last 4 decoder layers first-order
}
LAYERS = {"smollm2-135m": 30, "tiny-random-llama": 4}


def scale(quick: bool) -> dict:
    if quick:
        return {"model": "tiny-random-llama", "zo_steps": 6, "fo_steps": 4, "search_frac": 0.5, "test": 16,
                "val": 8, "mem_steps": 2, "speed_reps": 2}
    return {"model": MODEL, "zo_steps": 1000, "fo_steps": 150, "search_frac": 0.2, "test": 200, "val": 100,
            "mem_steps": 3, "speed_reps": 5}


def _train_cfg(opt: str, steps: int, lr: float, extra: dict | None = None, eps: float | None = None):
    from patchlm.train import TrainConfig

    kw = {"optimizer": opt, "steps": steps, "lr": lr, "batch_size": 8, "max_length": 128, "bf16": True,
          "schedule": "constant", "warmup": 0, "progress": False, "eval_limit": 8, "seed": 0}
    if eps is not None:
        kw["zo_eps"] = eps
    kw.update(extra or {})
    return TrainConfig(**kw)


def _fit(model: str, scheme: str, task_name: str, cfg, limit: int, split: str) -> dict:
    """Train one patch and evaluate it; returns accuracy, forward passes, seconds, tokens/s."""
    from patchlm.data import load_task
    from patchlm.evaluate import evaluate
    from patchlm.models import load_base
    from patchlm.train import Trainer

    kind, spec = SCHEMES[scheme]
    base = load_base(model)
    task = load_task(task_name)
    t0 = time.perf_counter()
    patch = Trainer(base, kind, dict(spec), task, cfg).run()
    secs = time.perf_counter() - t0
    m = evaluate(base.model, base.tokenizer, task, split=split, limit=limit, bf16=True)
    return {"accuracy": m["accuracy"], "forward_passes": patch.metrics.get("forward_passes"), "seconds": secs,
            "tokens_per_s": patch.metrics.get("train_tokens_per_s")}


def _kind_available(scheme: str) -> bool:
    from patchlm.errors import UnknownNameError
    from patchlm.patch import get_kind

    try:
        get_kind(SCHEMES[scheme][0])
        return True
    except UnknownNameError:
        return False


def search(cache: RowCache, sc: dict, name: str, opt: str, scheme: str, steps: int, extra: dict) -> dict:
    """The row's learning rate (and eps for ZO) chosen on validation data of the first task after a short run."""
    fam = "fo" if opt in FO else "zo"
    grid = [lr * (SGD_SCALE if opt == "sgd" else 1.0) for lr in LR_GRID[(fam, scheme)]]
    short = max(2, int(steps * sc["search_frac"]))
    points = []
    for lr in grid:
        key = f"search/{name}/lr={lr:g}"
        r = cache.run(key, lambda lr=lr: _fit(sc["model"], scheme, TASKS[0], _train_cfg(opt, short, lr, extra),
                                              sc["val"], "validation"))
        points.append({"lr": lr, "eps": 1e-3 if fam == "zo" else None, "val_accuracy": r["accuracy"]})
    best = max(points, key=lambda p: p["val_accuracy"])
    if fam == "zo":
        for eps in EPS_GRID:
            key = f"search/{name}/lr={best['lr']:g}/eps={eps:g}"
            r = cache.run(key, lambda eps=eps: _fit(sc["model"], scheme, TASKS[0],
                                                    _train_cfg(opt, short, best["lr"], extra, eps=eps),
                                                    sc["val"], "validation"))
            points.append({"lr": best["lr"], "eps": eps, "val_accuracy": r["accuracy"]})
        best = max(points, key=lambda p: p["val_accuracy"])
    return {"lr": best["lr"], "eps": best["eps"], "search_steps": short, "points": points}


def accuracy_row(cache: RowCache, sc: dict, name: str) -> dict | None:
    if name in ENHANCEMENTS:
        extra, per_step = ENHANCEMENTS[name]
        if extra.get("zo_fo_layers") == "LAST4":
            n = LAYERS[sc["model"]]
            k = 4 if n > 8 else n // 2
            extra = {**extra, "zo_fo_layers": f"{n - k}-{n - 1}"}
        opt, scheme = "zo-sgd", "lora"
        steps = sc["zo_steps"] * 2 // per_step  # equal forward passes with plain ZO-SGD
    else:
        opt, scheme = name.split("/")
        extra, steps = {}, (sc["fo_steps"] if opt in FO else sc["zo_steps"])
    if not _kind_available(scheme):
        return None
    chosen = search(cache, sc, name, opt, scheme, steps, extra)
    row = {"name": name, "optimizer": opt, "scheme": scheme, "steps": steps, "lr": chosen["lr"],
           "eps": chosen["eps"], "search": chosen["points"], **{k: v for k, v in extra.items()}}
    accs, fwd, secs, tps = [], 0, 0.0, []
    for t in TASKS:
        r = cache.run(f"row/{name}/{t}", lambda t=t: _fit(sc["model"], scheme, t,
                                                          _train_cfg(opt, steps, chosen["lr"], extra, chosen["eps"]),
                                                          sc["test"], "test"))
        row[f"acc_{t}"] = r["accuracy"]
        accs.append(r["accuracy"])
        fwd += r["forward_passes"] or 0
        secs += r["seconds"]
        tps.append(r["tokens_per_s"] or 0.0)
    row.update({"mean_accuracy": sum(accs) / len(accs), "forward_passes": fwd // len(TASKS),
                "wall_seconds": secs / len(TASKS), "train_tokens_per_s": sum(tps) / len(tps)})
    return row


def zero_shot(cache: RowCache, sc: dict) -> dict:
    def run():
        from patchlm.data import load_task
        from patchlm.evaluate import evaluate
        from patchlm.models import load_base

        base = load_base(sc["model"])
        return {f"acc_{t}": evaluate(base.model, base.tokenizer, load_task(t), split="test", limit=sc["test"],
                                     bf16=True)["accuracy"] for t in TASKS}

    r = cache.run("row/zero-shot", run)
    return {"name": "zero-shot", "optimizer": None, "scheme": None, **r,
            "mean_accuracy": sum(r[f"acc_{t}"] for t in TASKS) / len(TASKS), "forward_passes": 0}


# ---------------------------------------------------------------- memory (fresh processes)
def memory_worker(model: str, opt: str, scheme: str, steps: int) -> dict:
    """Runs in a subprocess: `steps` training steps (or, for opt == 'inference', the loss once, no grad)."""
    import resource

    import torch

    from patchlm.data import load_task
    from patchlm.data.features import build_features, collate, pad_id
    from patchlm.models import load_base
    from patchlm.train.engine import causal_lm_loss, make_closure, to_device

    torch.manual_seed(0)
    base = load_base(model)
    task = load_task(TASKS[0])
    feats = build_features(task, "train", base.tokenizer, "classification", 128)[:8]
    batch = collate(feats, pad_id(base.tokenizer))
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if opt == "inference":
        # frozen weights, as for serving: autocast keeps a bf16 copy of every fp32 weight that requires grad (its
        # cast cache), which would inflate the inference baseline by half the model's size
        base.model.requires_grad_(False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            base.model.eval()
            causal_lm_loss(base.model, to_device(batch, "cpu"))
    else:
        from patchlm.patch import get_kind
        from patchlm.train.optim import make_optimizer

        kind, spec = SCHEMES[scheme]
        k = get_kind(kind)
        k.attach(base.model, dict(spec, seed=0), None, seed=0)
        params = k.trainable_parameters(base.model)
        cfg = _train_cfg(opt, steps, 1e-6)
        rule = make_optimizer(opt, params, cfg, model=base.model)
        base.model.train()
        for _ in range(steps):
            rule.step(make_closure(base.model, [batch], causal_lm_loss, True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "floor_mb": floor / 1024}


def memory_rows(cache: RowCache, sc: dict) -> list[dict]:
    rows = []
    jobs = [("inference", "full")] + [(o, s) for s in ("full", "lora") for o in OPTIMIZERS]
    for opt, scheme in jobs:
        if opt != "inference" and not _kind_available(scheme):
            continue

        def run(opt=opt, scheme=scheme):
            out = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(
                {"model": sc["model"], "opt": opt, "scheme": scheme, "steps": sc["mem_steps"]})],
                capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        r = cache.run(f"memory/{opt}/{scheme}", run)
        rows.append({"optimizer": opt, "scheme": scheme if opt != "inference" else "-", **r})
    inf = next(r for r in rows if r["optimizer"] == "inference")["peak_mb"]
    for r in rows:
        r["ratio_to_inference"] = r["peak_mb"] / inf
    return rows


# ---------------------------------------------------------------- speed
def speed_rows(cache: RowCache, sc: dict) -> list[dict]:
    def run(scheme, dist):
        import torch

        from patchlm.data import load_task
        from patchlm.data.features import build_features, collate, pad_id
        from patchlm.models import load_base
        from patchlm.patch import get_kind
        from patchlm.train.engine import causal_lm_loss, make_closure
        from patchlm.train.optim import make_optimizer

        base = load_base(sc["model"])
        task = load_task(TASKS[0])
        feats = build_features(task, "train", base.tokenizer, "classification", 128)[:8]
        batch = collate(feats, pad_id(base.tokenizer))
        kind, spec = SCHEMES[scheme]
        k = get_kind(kind)
        k.attach(base.model, dict(spec, seed=0), None, seed=0)
        rule = make_optimizer("zo-sgd", k.trainable_parameters(base.model),
                              _train_cfg("zo-sgd", 1, 1e-7, {"zo_distribution": dist}), model=base.model)
        fwd, stp = [], []
        for _ in range(sc["speed_reps"] + 1):  # the first of each is a warm-up
            c = make_closure(base.model, [batch], causal_lm_loss, True)
            t0 = time.perf_counter()
            with torch.no_grad():
                c(backward=False)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rule.step(make_closure(base.model, [batch], causal_lm_loss, True))
            stp.append(time.perf_counter() - t0)
        f, s = min(fwd[1:]), min(stp[1:])
        return {"forward_s": f, "zo_step_s": s, "step_over_forward": s / f}

    rows = []
    for sch in ("lora", "full"):
        for dist in ("gaussian", "rademacher"):
            key = f"speed/{sch}" + ("" if dist == "gaussian" else f"/{dist}")
            rows.append({"scheme": sch, "distribution": dist,
                         **cache.run(key, lambda sch=sch, dist=dist: run(sch, dist))})
    return rows


# ---------------------------------------------------------------- page
def page(rows, mem, speed, zs, sc) -> str:
    cols = ["name", "optimizer", "scheme", *[f"acc_{t}" for t in TASKS], "mean_accuracy", "forward_passes",
            "wall_seconds", "train_tokens_per_s", "peak_memory_mb", "inference_memory_mb", "lr", "eps"]
    lines = [f"{sc['model']}, batch 8, bf16 autocast, same data order for every row; ZO rows {sc['zo_steps']} steps, "
             f"first-order rows {sc['fo_steps']}; test accuracy on the first {sc['test']} test examples.", ""]
    lines.append(md_table([zs, *rows], cols))
    lines += ["", "## Memory: fresh processes (peak resident MB)", "", md_table(mem, ["optimizer", "scheme", "peak_mb",
                                                                              "ratio_to_inference"])]
    lines += ["", "## Speed: one ZO-SGD step against one forward pass of the same batch (best of repeats)", "",
              md_table(speed, ["scheme", "distribution", "forward_s", "zo_step_s", "step_over_forward"])]
    lines += ["", "## Learning-rate and eps search (validation accuracy after a short run)", ""]
    for r in rows:
        pts = ", ".join(f"lr {p['lr']:g}" + (f" eps {p['eps']:g}" if p.get("eps") else "")
                        + f": {p['val_accuracy']:.3f}"
                        for p in r.get("search", []))
        lines.append(f"- {r['name']}: {pts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", default="all", choices=["all", "memory", "speed", "accuracy", "page"])
    ap.add_argument("--rows", default="", help="comma-separated row names (optimizer/scheme or an enhancement)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_worker:
        kw = json.loads(a.memory_worker)
        print(json.dumps(memory_worker(kw["model"], kw["opt"], kw["scheme"], kw["steps"])))
        return
    sc = scale(a.quick)
    cache = RowCache("zo", "quick" if a.quick else "full", committed=True)
    names = [f"{o}/{s}" for s in SCHEMES for o in OPTIMIZERS] + list(ENHANCEMENTS)
    wanted = [n for n in a.rows.split(",") if n] or names
    mem = memory_rows(cache, sc) if a.phase in ("all", "memory", "page") else []
    speed = speed_rows(cache, sc) if a.phase in ("all", "speed", "page") else []
    rows = []
    if a.phase in ("all", "accuracy", "page"):
        for n in names:
            if n in wanted or (a.phase == "page" and cache.get(f"row/{n}/{TASKS[-1]}")):
                if a.phase == "page" and not cache.get(f"row/{n}/{TASKS[-1]}"):
                    continue
                r = accuracy_row(cache, sc, n)
                if r is not None:
                    rows.append(r)
    zs = zero_shot(cache, sc)
    by = {(m["optimizer"], m["scheme"]): m for m in mem}
    inf = by.get(("inference", "-"), {}).get("peak_mb")
    for r in rows:
        m = by.get((r["optimizer"], r["scheme"]))
        r["peak_memory_mb"] = m["peak_mb"] if m else None
        r["inference_memory_mb"] = inf
    if not a.quick:
        write_results("zo", [zs, *rows], page(rows, mem, speed, zs, sc), extra={"memory": mem, "speed": speed})
    else:
        print(page(rows, mem, speed, zs, sc))


if __name__ == "__main__":
    main()
