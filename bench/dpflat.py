"""DP-Flat against DP-SGD, centralised (issue 19, part 4): one private training set, one accountant.

    PATCHLM_BENCH_LOCK=/tmp/patchlm-cpu.lock python bench/dpflat.py     # every row (committed; resumes)
    python bench/dpflat.py --rows 'rotten_tomatoes/*/eps3/s0/*'          # a subset (fnmatch over run keys)
    python bench/dpflat.py --quick                                       # smoke run on tiny-random-llama
    python bench/dpflat.py --page-only                                   # rewrite the page from the rows

Rows, per task (rotten_tomatoes, sms_spam) and seed (0, 1, 2): non-private LoRA, DP-SGD, and DP-Flat with each of
its three parts alone (minmax, layers, distill) and all three, each private row at epsilon 3 and 8 (delta 1/n^1.1,
n the training set's size). Every row trains the same LoRA (r 8, alpha 16, q and v projections) for the same
number of Poisson-sampled steps (sampling rate batch / n) with AdamW through the engine (`dp_train`;
the non-private row runs the same batches without clipping or noise). The noise multiplier is the one that spends
the row's epsilon exactly over those steps (Opacus `get_noise_multiplier`, RDP accountant); the learning rate and
the clipping norm are searched per row over a small grid and chosen on dev data.

Data roles: the task's training split is the private data. Its validation split is public: the first `public`
examples train DP-Flat's teacher (layer choice, distillation), the next `dev` ones choose each row's grid point;
the test split scores the chosen point. The search's privacy cost is stated on the page: releasing the best of k
private runs on the same data is (k x epsilon)-DP by basic composition (tighter bounds exist, e.g. Papernot and
Steinke 2022 for a random number of runs; we claim only the basic one).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowCache, md_table, write_results

TASKS = ["rotten_tomatoes", "sms_spam"]
# row name -> DP-Flat parts ("" = plain DP-SGD, None = non-private)
METHODS: dict[str, str | None] = {"nonprivate": None, "dp-sgd": "", "flat-minmax": "minmax",
                                  "flat-layers": "layers", "flat-distill": "distill",
                                  "flat-all": "minmax,layers,distill"}
# controls of the layers part (and DP-Flat without it), run only at the grid point that DP-SGD chose (per task,
# epsilon and seed):
# name -> (DP-Flat parts, DPConfig overrides, what the page calls it)
CONTROLS: dict[str, tuple[str, dict, str]] = {
    "flat-layers-random": ("layers", {"flat_choice": "random"}, "layers, random choice"),
    "flat-layers-keep0.75": ("layers", {"flat_keep": 0.75}, "layers, keep 0.75"),
    "flat-minmax-distill": ("minmax,distill", {}, "minmax,distill (all but layers)")}
EPSILONS = [3.0, 8.0]
SEEDS = [0, 1, 2]
FULL = {"model": "smollm2-135m", "steps": 100, "batch": 32, "max_length": 128, "test": 400, "public": 256,
        "dev": 200, "teacher_steps": 30, "lora": {"r": 8, "alpha": 16, "targets": "qv", "dropout": 0.0},
        "grid": {"lr": [5e-4, 2e-3], "clip": [0.1, 1.0]}, "choice": {"draws": 8, "batches": 4}, "tag": "full"}
QUICK = {"model": "tiny-random-llama", "steps": 3, "batch": 8, "max_length": 64, "test": 16, "public": 16,
         "dev": 16, "teacher_steps": 2, "lora": {"r": 4, "alpha": 8, "targets": "qv", "dropout": 0.0},
         "grid": {"lr": [1e-3], "clip": [1.0]}, "choice": {"draws": 4, "batches": 2}, "tag": "quick"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def grid(sc: dict, method: str) -> list[tuple[float, float]]:
    """(lr, clip) candidates of a row: the non-private row has no clipping to search."""
    clips = [math.inf] if METHODS[method] is None else sc["grid"]["clip"]
    return list(itertools.product(sc["grid"]["lr"], clips))


def recipe(method: str) -> tuple[str | None, dict]:
    """A method's DP-Flat parts ("" = DP-SGD, None = non-private) and its DPConfig overrides."""
    if method in CONTROLS:
        return CONTROLS[method][0], CONTROLS[method][1]
    return METHODS[method], {}


def run_key(task: str, method: str, eps: float | None, seed: int, lr: float, clip: float) -> str:
    e = "nonprivate" if eps is None else f"eps{eps:g}"
    return f"{task}/{method}/{e}/s{seed}/lr{lr:g}-c{clip:g}"


def train_run(task_name: str, method: str, eps: float | None, seed: int, lr: float, clip: float, sc: dict) -> dict:
    """One training of the row's recipe at one grid point: dev and test accuracy, epsilon spent, seconds."""
    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear
    from patchlm.data import load_task
    from patchlm.data.features import build_features, pad_id
    from patchlm.evaluate import evaluate_classification
    from patchlm.federated.privacy import DPConfig, default_delta, dp_train, poisson_batches, step_config
    from patchlm.models import load_base
    from patchlm.train.engine import example_mean_loss, train_loop, unit_count
    from patchlm.train.optim import make_optimizer

    torch.manual_seed(seed)
    base = load_base(sc["model"])
    task = load_task(task_name)
    tok = base.tokenizer
    kind = LoraKind()
    kind.attach(base.model, dict(sc["lora"]), None, seed=seed)
    params = kind.trainable_parameters(base.model)
    mods = wrapped_modules(base.model, LoraLinear)
    feats = build_features(task, "train", tok, "classification", sc["max_length"])
    public = build_features(task, "validation", tok, "classification", sc["max_length"], limit=sc["public"])
    dev = task.validation[sc["public"]: sc["public"] + sc["dev"]]
    n, pad = len(feats), pad_id(tok)
    q = min(1.0, sc["batch"] / n)
    delta = default_delta(n)
    t0 = time.perf_counter()
    out: dict = {"task": task_name, "method": method, "epsilon_target": eps, "seed": seed, "lr": lr, "clip": clip,
                 "steps": sc["steps"], "sample_rate": q, "delta": delta, "train_examples": n}
    parts, overrides = recipe(method)
    if overrides:
        out["dp_overrides"] = overrides
    if parts is None:  # the same Poisson batches and AdamW, no clipping, no noise
        losses: list[float] = []
        train_loop(base.model, make_optimizer("adamw", params, step_config(lr)),
                   poisson_batches(feats, pad, sc["steps"], q, seed), sc["steps"], loss_fn=example_mean_loss,
                   bf16=True, count=unit_count,
                   on_step=lambda i: None if math.isnan(i.loss) else losses.append(i.loss))
        out.update({"epsilon": math.inf, "noise_multiplier": 0.0,
                    "train_loss": sum(losses) / max(1, len(losses))})
    else:
        noise = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=sc["steps"],
                                     accountant="rdp")
        dp = DPConfig(noise_multiplier=noise, max_grad_norm=clip, delta=delta, flat=bool(parts),
                      flat_parts=parts or DPConfig.flat_parts, teacher_steps=sc["teacher_steps"], **overrides)
        rec = dp_train(base.model, params, feats, pad, steps=sc["steps"], batch_size=sc["batch"], lr=lr, dp=dp,
                       seed=seed, bf16=True, lora_modules=mods, public_feats=public, log=None)
        out.update({k: rec[k] for k in ("epsilon", "noise_multiplier", "train_loss") if k in rec})
        out.update({k: rec[k] for k in ("kept_layers", "num_layers", "layer_sharpness_change", "flat_score_dtype")
                    if k in rec})
    out["train_seconds"] = time.perf_counter() - t0
    base.model.eval()
    d = evaluate_classification(base.model, tok, task, examples=dev, bf16=True)
    t = evaluate_classification(base.model, tok, task, split="test", limit=sc["test"], bf16=True)
    out.update({"dev_accuracy": d["accuracy"], "test_accuracy": t["accuracy"], "test_macro_f1": t["macro_f1"],
                "test_examples": t["n"]})
    return out


def flat_keep() -> float:
    """The fraction of layers the layers part keeps (DPConfig's default, which the study's rows use)."""
    from patchlm.federated.config import DPConfig

    return DPConfig.flat_keep


# the choice rows: bf16 = the stability study with scores under bf16 autocast (as dp_train scored before its
# float32 fix), numerics = bf16 against float32 on the same draws, fp32 = the stability study as dp_train scores now
CHOICE_MODES = {"bf16": "", "numerics": "/numerics", "fp32": "/fp32"}


def choice_key(task: str, seed: int, lr: float, mode: str = "bf16") -> str:
    return f"choice/{task}/s{seed}/lr{lr:g}" + CHOICE_MODES[mode]


def choice_run(task_name: str, seed: int, lr: float, sc: dict, mode: str = "bf16") -> dict:
    """How much of the flatness choice is estimate noise: the teacher that dp_train trains for (task, seed, lr), then
    the layers' flatness scores per draw on the public batch that dp_train scores (batch 0, with the study's
    `draws`), and with 2 draws (as dp_train) on the next public batches of the same size, under bf16 autocast
    (mode bf16) or in float32 (mode fp32, as dp_train scores since its fix). dp_train's own choice is the mean of
    batch 0's first two draws; the other draw pairs are independent repeats of it (estimate noise alone), the other
    batches repeat it on other public data (data noise). Mode numerics, instead: the 2-draw estimate again under
    bf16 (does a second computation reproduce it?) and with the same draws in float32 (how much of a score is bf16
    rounding: the scores are loss differences of a few 1e-3)."""
    import torch

    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear
    from patchlm.data import load_task
    from patchlm.data.features import build_features, collate, pad_id
    from patchlm.federated.privacy import flatness_scores, train_public_teacher
    from patchlm.models import load_base
    from patchlm.train.engine import autocast

    torch.manual_seed(seed)  # the state train_run leaves before dp_train
    base = load_base(sc["model"])
    task = load_task(task_name)
    kind = LoraKind()
    kind.attach(base.model, dict(sc["lora"]), None, seed=seed)
    params = kind.trainable_parameters(base.model)
    mods = wrapped_modules(base.model, LoraLinear)
    public = build_features(task, "validation", base.tokenizer, "classification", sc["max_length"],
                            limit=sc["public"])
    pad, b = pad_id(base.tokenizer), sc["batch"]
    t0 = time.perf_counter()
    train_public_teacher(base.model, params, public, pad, sc["teacher_steps"], b, lr, seed, True)
    teacher_seconds = time.perf_counter() - t0
    device = next(base.model.parameters()).device

    def scores(k: int, draws: int, bf16: bool = True) -> dict[str, list[float]]:
        return flatness_scores(base.model, mods, collate(public[k * b:(k + 1) * b], pad), seed,
                               lambda: autocast(device, bf16), draws=draws)

    c = sc["choice"]
    t0 = time.perf_counter()
    out = {"task": task_name, "seed": seed, "lr": lr, "teacher_steps": sc["teacher_steps"], "batch": b,
           "draws": c["draws"], "mode": mode}
    if mode == "numerics":  # the 2-draw estimate again (batch 0) under bf16, then with the same draws in float32
        out["scores_bf16"] = scores(0, 2)
        out["scores_fp32"] = scores(0, 2, bf16=False)
    else:
        bf16 = mode == "bf16"
        out["scores"] = [scores(0, c["draws"], bf16)] + [scores(k, 2, bf16) for k in range(1, c["batches"])]
    out.update({"teacher_seconds": teacher_seconds, "score_seconds": time.perf_counter() - t0})
    return out


def _kept(scores: dict[str, float], keep: float) -> set[str]:
    """The layers the layers part keeps for these scores (dp_train's ranking)."""
    from patchlm.federated.privacy import top_layers

    return set(top_layers(scores, keep))


def _spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman correlation of two layer -> score maps over their layers."""
    from scipy.stats import spearmanr

    layers = sorted(a)
    return float(spearmanr([a[x] for x in layers], [b[x] for x in layers]).statistic)


def choice_stability(row: dict, keep: float, run: dict | None) -> tuple[list[str], list[dict]]:
    """The page's account of one choice_run row: the per-layer scores with their standard errors, and how often
    the choice (dp_train's: the top `keep` of the mean of two draws) agrees with itself when repeated with other
    draws or on other public batches, against two random choices. `run`: the flat-layers run at the same
    (task, seed, lr), whose recorded scores batch 0's first two draws reproduce."""
    from patchlm.federated.privacy import keep_count

    first, others = row["scores"][0], row["scores"][1:]
    layers = sorted(first, key=lambda lay: int(lay.rsplit(".", 1)[-1]))
    n, d = len(layers), len(first[layers[0]])
    k = keep_count(n, keep)
    mean = statistics.fmean

    def choice(vec: dict[str, float]) -> set[str]:
        return _kept(vec, keep)

    def agree(vecs: list[dict[str, float]]) -> tuple[float, float]:
        """Mean over pairs: kept layers in common, Spearman correlation of the scores."""
        pairs = list(itertools.combinations(vecs, 2))
        return (mean([len(choice(a) & choice(b)) for a, b in pairs]),
                mean([_spearman(a, b) for a, b in pairs]))

    pair_vecs = [{x: mean(first[x][j:j + 2]) for x in layers} for j in range(0, d - 1, 2)]  # dp_train's estimate
    batch_vecs = [pair_vecs[0]] + [{x: mean(o[x]) for x in layers} for o in others]
    full = {x: mean(first[x]) for x in layers}
    se = {x: statistics.stdev(first[x]) / d ** 0.5 for x in layers}
    table = [{"layer": x, f"mean_{d}_draws": full[x], "std_error": se[x], "t": full[x] / se[x] if se[x] else None,
              "first_2_draws": pair_vecs[0][x], "kept_by_run": (x in run["kept_layers"]) if run else None,
              f"kept_by_{d}_draws": x in choice(full)} for x in layers]
    sure = sum(abs(full[x]) > 2 * se[x] for x in layers)
    pc, pr = agree(pair_vecs)
    bc, br = agree(batch_vecs)
    dtype = ("in float32, as dp_train scores them" if row.get("mode") == "fp32" else
             "under bf16 autocast, as dp_train scored them before its float32 fix")
    lines = [f"{row['task']} seed {row['seed']}, scores {dtype} (teacher at lr {row['lr']:g}, "
             f"{row['teacher_steps']} steps on the public data), keeping {k} of {n} layers; two random choices share "
             f"{k * k / n:.1f} layers on average:",
             "",
             f"- estimate noise: the {len(pair_vecs)} disjoint pairs of batch 0's {d} draws (each pair is "
             f"dp_train's estimate) share {pc:.1f} of their {k} kept layers on average (Spearman {pr:.2f} between "
             "their scores);",
             f"- data noise: the choices on {len(batch_vecs)} public batches of {row['batch']} (2 draws each) share "
             f"{bc:.1f} (Spearman {br:.2f});",
             f"- with all {d} draws, {sure} of {n} layers' scores are more than 2 standard errors from 0; the "
             f"{d}-draw choice shares {len(choice(full) & choice(pair_vecs[0]))} layers with the 2-draw one."]
    if run and run.get("layer_sharpness_change") and (run.get("flat_score_dtype") == "float32") == \
            (row.get("mode") == "fp32"):
        diff = max(abs(run["layer_sharpness_change"][x] - pair_vecs[0][x]) for x in layers)
        same = set(run["kept_layers"]) == choice(pair_vecs[0])
        lines.append(f"- reproduction: batch 0's first two draws give the flat-layers run's scores within {diff:.1g} "
                     f"({'the same' if same else 'a different'} kept set).")
    return [*lines, ""], table


def choice_numerics(row: dict, keep: float, first: dict | None, run: dict | None) -> list[str]:
    """The page's account of a numerics row: dp_train's estimate scored again in a second process under bf16
    (against the choice row's first two draws and the flat-layers run's record) and in float32 with the same draws."""
    from patchlm.federated.privacy import keep_count

    mean = statistics.fmean
    b16 = {x: mean(v) for x, v in row["scores_bf16"].items()}
    f32 = {x: mean(v) for x, v in row["scores_fp32"].items()}
    k = keep_count(len(b16), keep)

    def compare(a: dict[str, float], b: dict[str, float]) -> str:
        diff = max(abs(a[x] - b[x]) for x in a)
        return (f"max difference {diff:.2g}, Spearman {_spearman(a, b):.2f}, "
                f"{len(_kept(a, keep) & _kept(b, keep))} of {k} kept layers shared")

    out = [f"Numerics, {row['task']} seed {row['seed']} (the same teacher trained again, batch 0, the same 2 draws; "
           f"the scores' spread over layers is {statistics.pstdev(b16.values()):.2g}):", ""]
    if first:
        pair = {x: mean(v[:2]) for x, v in first["scores"][0].items()}
        out.append(f"- bf16 here against the choice row's first two draws (a second computation, the same code): "
                   f"{compare(b16, pair)};")
    if run and run.get("layer_sharpness_change"):
        out.append(f"- bf16 here against the flat-layers run's record (dp_train's choice inside the DP run; a "
                   f"record older than the perturbation's undoing by copy was undone by subtraction, which leaves "
                   f"the weights off by about 1e-7): "
                   f"{compare(b16, run['layer_sharpness_change'])};")
    out += [f"- float32 against bf16 (the same draws): {compare(f32, b16)}.", ""]
    return out


def lora_size(sc: dict) -> int:
    """d, the study's trainable LoRA parameters: what the noise of a privatised gradient spreads over. Counted by
    attaching the study's LoRA (the one the runs train) to the model built on the meta device: no weights load."""
    import torch
    import transformers

    from patchlm.adapters.lora import LoraKind
    from patchlm.models.checkpoint import resolve_checkpoint

    config = transformers.AutoConfig.from_pretrained(resolve_checkpoint(sc["model"]))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    kind = LoraKind()
    kind.attach(model, dict(sc["lora"]), None, seed=0)
    return sum(p.numel() for p in kind.trainable_parameters(model))


def noise_ratios(sc: dict, n: int, d: int, eps: float, scales=(1, 4, 16, 64)) -> list[dict]:
    """The accountant's noise multiplier sigma for the study's steps at each expected batch B, and sigma sqrt(d) / B:
    the privatised mean gradient's noise norm over the largest norm its signal can have (C, the clipping norm).
    Above 1, every step is mostly noise, whatever the optimizer does with it."""
    from opacus.accountants.utils import get_noise_multiplier

    from patchlm.federated.privacy import default_delta

    out = []
    for b in (sc["batch"] * k for k in scales):
        sigma = get_noise_multiplier(target_epsilon=eps, target_delta=default_delta(n), sample_rate=min(1.0, b / n),
                                     steps=sc["steps"], accountant="rdp")
        out.append({"batch": b, "epsilon": eps, "noise_multiplier": sigma, "noise_to_signal": sigma * d ** 0.5 / b,
                    "epochs": sc["steps"] * b / n})
    return out


def chosen(runs: list[dict]) -> dict:
    """The grid point with the best dev accuracy (ties: the first in grid order), with the search's size."""
    best = max(runs, key=lambda r: r["dev_accuracy"])  # max keeps the first of equals
    return {**best, "grid_points": len(runs)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (task, method, epsilon), and the share of the DP-SGD -> non-private gap closed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["epsilon_target"]), []).append(r)
    out = []
    for (task, method, eps), rs in groups.items():
        accs = [r["test_accuracy"] for r in rs]
        out.append({"task": task, "method": method, "epsilon_target": eps, "seeds": len(rs),
                    "test_accuracy": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else None,
                    "macro_f1": statistics.mean(r["test_macro_f1"] for r in rs),
                    "epsilon_spent": max(r["epsilon"] for r in rs),
                    "grid_points": rs[0]["grid_points"]})
    by = {(s["task"], s["method"], s["epsilon_target"]): s for s in out}
    for s in out:
        if METHODS[s["method"]]:  # a DP-Flat row: the gap it closes at its epsilon, where both ends are measured
            lo, hi = by.get((s["task"], "dp-sgd", s["epsilon_target"])), by.get((s["task"], "nonprivate", None))
            if lo and hi and hi["test_accuracy"] != lo["test_accuracy"]:
                s["gap_closed"] = ((s["test_accuracy"] - lo["test_accuracy"])
                                   / (hi["test_accuracy"] - lo["test_accuracy"]))
    return out


def choice_sensitivity(summary: list[dict], rows: list[dict], runs: list[dict], sc: dict) -> list[str]:
    """How firmly dev data chose flat-all's grid point: its dev margin in examples, and the share of the DP-SGD gap
    each of its grid points closes on test (a diagnosis of the choice, not a result: picking by test is not allowed)."""
    by = {(s["task"], s["method"], s["epsilon_target"]): s for s in summary}
    out = []
    for r in (x for x in rows if x["method"] == "flat-all"):
        lo, hi = by.get((r["task"], "dp-sgd", r["epsilon_target"])), by.get((r["task"], "nonprivate", None))
        if not lo or not hi or hi["test_accuracy"] == lo["test_accuracy"]:
            continue
        pts = [x for x in runs if (x["task"], x["method"], x["epsilon_target"], x["seed"])
               == (r["task"], "flat-all", r["epsilon_target"], r["seed"])]
        others = [x["dev_accuracy"] for x in pts if (x["lr"], x["clip"]) != (r["lr"], r["clip"])]
        margin = round((r["dev_accuracy"] - max(others)) * sc["dev"]) if others else None
        gap = hi["test_accuracy"] - lo["test_accuracy"]
        closes = ", ".join(f"lr {x['lr']:g} clip {x['clip']:g}: {(x['test_accuracy'] - lo['test_accuracy']) / gap:.2f}"
                           for x in pts)
        out.append(f"{r['task']} epsilon {r['epsilon_target']:g} seed {r['seed']}: dev chose lr {r['lr']:g} clip "
                   f"{r['clip']:g} by {margin} of {sc['dev']} dev examples over the runner-up; the gap each grid "
                   f"point closes on test (diagnosis only) is {closes}.")
    return ["How firm the choice is:", "", *[f"- {x}" for x in out], ""] if out else []


def ablation(rows: list[dict], every: list[dict]) -> list[dict]:
    """Every method's run at the grid point that DP-SGD chose on dev data (same task, epsilon, seed, lr and clip),
    with its change against DP-SGD there: the parts compared at the baseline's hyperparameters, partial grids
    included (so the comparison does not wait for every part's whole grid)."""
    out = []
    for ref in (r for r in rows if r["method"] == "dp-sgd"):
        at = {r["method"]: r for r in every if (r["task"], r["epsilon_target"], r["seed"], r["lr"], r["clip"])
              == (ref["task"], ref["epsilon_target"], ref["seed"], ref["lr"], ref["clip"])}
        for m in [*METHODS, *CONTROLS]:
            if m in at:
                r = at[m]
                out.append({"task": r["task"], "epsilon_target": r["epsilon_target"], "seed": r["seed"],
                            "lr": r["lr"], "clip": r["clip"], "method": m,
                            "parts": CONTROLS[m][2] if m in CONTROLS else METHODS[m],
                            "kept_layers": len(r["kept_layers"]) if "kept_layers" in r else None,
                            "dev_accuracy": r["dev_accuracy"], "test_accuracy": r["test_accuracy"],
                            "test_macro_f1": r["test_macro_f1"],
                            "vs_dp_sgd": r["test_accuracy"] - ref["test_accuracy"]})
    return out


def page(summary: list[dict], rows: list[dict], runs: list[dict], missing: list[str], sc: dict,
         every: list[dict] | None = None, choices: list[dict] | None = None,
         archived: list[dict] | None = None) -> str:
    """The study's page; `every`: every cached run, partial grids included (for the ablation at one point);
    `choices`: the choice_run rows; `archived`: the runs whose layer choice was scored under bf16 (before the fix)."""
    abl = ablation(rows, every or [])
    k = len(sc["grid"]["lr"]) * len(sc["grid"]["clip"])
    out = ["DP-Flat against DP-SGD and non-private LoRA, centralised (one private training set, one RDP "
           "accountant). " + (f"**Partial**: {len(missing)} of the study's rows are still to run "
                              f"(`python bench/dpflat.py` resumes; each takes one training per grid point)."
                              if missing else "Every row measured."), ""]
    out += ["## Summary (test accuracy at the dev-chosen grid point, mean over seeds)", "",
            md_table(sorted(summary, key=lambda s: (s["task"], s["epsilon_target"] or 1e9, s["method"])),
                     ["task", "method", "epsilon_target", "seeds", "test_accuracy", "std", "macro_f1",
                      "epsilon_spent", "gap_closed"]), ""]
    hits = [s for s in summary if s["method"] == "flat-all" and s["epsilon_target"] == 3.0 and "gap_closed" in s]
    out += ["## Goal", "",
            "DP-Flat (all three parts) closes at least half of the gap between DP-SGD and non-private training at "
            "epsilon 3: " + ("; ".join(f"{s['task']} {s['gap_closed']:.2f} "
                                       f"({'met' if s['gap_closed'] >= 0.5 else 'not met'}, mean of {s['seeds']} of "
                                       f"{len(SEEDS)} seeds)" for s in hits)
                             if hits else "not measured yet")
            + ("; not measured yet on " + ", ".join(t for t in TASKS if t not in {s["task"] for s in hits})
               if hits and len(hits) < len(TASKS) else "")
            + (" with the float32 layer scores (the runs with the bf16-scored, numerically arbitrary choice are in "
               "the last sections)" if archived and not hits else "") + ".", ""]
    out += choice_sensitivity(summary, rows, runs, sc)
    out += ["## Setup", "",
            f"Model {sc['model']}; LoRA r {sc['lora']['r']}, alpha {sc['lora']['alpha']} on "
            f"{sc['lora']['targets']}; {sc['steps']} Poisson-sampled steps of expected batch {sc['batch']} "
            f"(rate batch/n), {sc['max_length']} tokens, AdamW at a constant rate, bf16 autocast. "
            f"Grid per row: lr {sc['grid']['lr']} x clipping norm {sc['grid']['clip']} ({k} private runs; the "
            f"non-private row searches lr only), chosen on {sc['dev']} dev examples (the validation split after "
            f"the first {sc['public']}, which are DP-Flat's public data). DP-Flat: DPConfig's defaults except "
            f"teacher_steps {sc['teacher_steps']} (its teacher trains on the public examples only); the min-max "
            "step perturbs along the previous privatised gradient, so no part spends privacy: each row's "
            "epsilon_spent is the accountant's over its own steps.", "",
            f"Privacy of the search: each run is (epsilon, delta)-DP; releasing the dev-best of {k} runs on the "
            f"same private data is ({k} x epsilon, {k} x delta)-DP by basic composition. The table's epsilon is "
            "per run, as papers report it; the search's cost is that bound.", "",
            f"Test: the first {sc['test']} test examples (accuracy and macro-F1; sms_spam is 87% ham, so its "
            "macro-F1 says more).", ""]
    sizes = {r["task"]: r["train_examples"] for r in rows}
    if sizes:
        d = lora_size(sc)
        out += ["## How much of a step is noise", "",
                f"A privatised step averages the clipped per-example gradients (each of norm at most C) and adds "
                f"Gaussian noise of std sigma C per coordinate, over d = {d:,} LoRA parameters: the noise's norm is "
                f"about sigma C sqrt(d) / B against at most C for the signal. The accountant's sigma for the study's "
                f"{sc['steps']} steps at epsilon 3, by expected batch B (the study runs B = {sc['batch']}):", ""]
        for task, n in sizes.items():
            ratios = noise_ratios(sc, n, d, 3.0)
            out += [f"{task} (n = {n:,}):", "",
                    md_table(ratios, ["batch", "epochs", "noise_multiplier", "noise_to_signal"]), ""]
            r0, best = ratios[0]["noise_to_signal"], min(ratios, key=lambda r: r["noise_to_signal"])
            if r0 > 2:
                out += [f"At the study's B = {sc['batch']} the noise is {r0:.1f} times the largest signal, so "
                        "every step is mostly noise (over the run the signal adds up step by step and the noise only "
                        f"as the square root of the steps, {sc['steps'] ** 0.5:.0f} times less at {sc['steps']} "
                        "steps: what a higher learning rate lets DP-SGD use). DP-Flat's parts change where the model "
                        f"sits and what it learns from public data, not this ratio. B = {best['batch']} would bring "
                        f"it to {best['noise_to_signal']:.1f} at {best['batch'] // sc['batch']} times the compute "
                        "per step (sigma grows more slowly than B at these sampling rates).", ""]
    out += ["## Chosen runs", "",
            md_table(rows, ["task", "method", "epsilon_target", "seed", "lr", "clip", "noise_multiplier",
                            "epsilon", "dev_accuracy", "test_accuracy", "train_seconds"]), ""]
    if abl:
        out += ["## Each part at DP-SGD's chosen grid point", "",
                "The parts compared at equal hyperparameters: every run at the (lr, clip) that DP-SGD chose on "
                "dev data, partial grids included (a part alone may not have its whole grid yet; its own "
                "dev-chosen point could differ). vs_dp_sgd: test accuracy minus DP-SGD's at the same point. With "
                f"{sc['test']} test examples a binomial standard error is about "
                f"{100 * (0.8 * 0.2 / sc['test']) ** 0.5:.1f} points per run (up to sqrt 2 times that for a "
                "difference, less as both runs score the same examples), so one seed does not resolve a difference "
                "of a few points.", "",
                md_table(abl, ["task", "epsilon_target", "seed", "lr", "clip", "method", "parts", "kept_layers",
                               "dev_accuracy", "test_accuracy", "test_macro_f1", "vs_dp_sgd"]), ""]
        groups: dict[tuple, list[str]] = {}
        for a in abl:
            if a["method"] != "dp-sgd":
                groups.setdefault((a["task"], a["epsilon_target"], a["seed"]), []).append(
                    f"{a['method']} {100 * a['vs_dp_sgd']:+.1f}")
        out += [f"Points against DP-SGD, {t} epsilon {e:g} seed {sd}: " + ", ".join(v) + "." for (t, e, sd), v
                in groups.items()] + [""]
        pts = {(a["task"], a["epsilon_target"], a["seed"], a["lr"], a["clip"]) for a in abl}
        scored = sorted((r for r in every or [] if r.get("layer_sharpness_change")),  # the ablation's point first
                        key=lambda r: (r["task"], r["epsilon_target"], r["seed"], r["lr"], r["clip"]) not in pts)
        if scored:
            r = scored[0]
            h = r["layer_sharpness_change"]
            order = sorted(h, key=lambda lay: int(lay.rsplit(".", 1)[-1]) if lay.rsplit(".", 1)[-1].isdigit()
                           else 0)
            out += ["The flatness choice's score per layer (sharpness change on the public batch when the "
                    f"layer's adapter is removed; the {len(r['kept_layers'])} highest are kept), from "
                    f"{r['task']} {r['method']} lr {r['lr']:g} clip {r['clip']:g}. The scores run from "
                    f"{min(h.values()):.4f} to {max(h.values()):.4f} ({sum(v < 0 for v in h.values())} of {len(h)} "
                    "negative: removing those layers' adapters made the loss flatter). Each is a difference of "
                    "two-draw Monte-Carlo estimates on one public batch (the same draws for every layer, a paired "
                    "comparison); how much of the ranking is estimate noise: "
                    + ("the next section." if choices else "not measured yet."), "",
                    md_table([{"layer": lay, "sharpness_change": h[lay], "kept": lay in r["kept_layers"]}
                              for lay in order], ["layer", "sharpness_change", "kept"]), ""]
    if choices:
        out += ["## How stable the flatness choice is", "",
                "The layers part keeps the layers whose adapter's removal sharpens the public loss most, each "
                "layer's score a paired Monte-Carlo estimate (dp_train: 2 draws on one public batch). Here the same "
                "teacher's scores are drawn again, with more draws and on other public batches "
                "(`python bench/dpflat.py --rows 'choice/*'`; no private data, no privacy spent). t: a layer's "
                "mean over the draws divided by its standard error.", ""]
        for c in choices:
            # the flat-layers run whose choice was scored in this row's precision (numerics rows: the bf16 one)
            want = "float32" if c.get("mode") == "fp32" else "bfloat16"
            run = next((r for r in [*(every or []), *(archived or [])] if r["method"] == "flat-layers"
                        and (r["task"], r["seed"], r["lr"]) == (c["task"], c["seed"], c["lr"])
                        and r.get("layer_sharpness_change") and r.get("flat_score_dtype") == want), None)
            if "scores_fp32" in c:
                first = next((x for x in choices if "scores" in x and x.get("mode", "bf16") == "bf16"
                              and (x["task"], x["seed"], x["lr"])
                              == (c["task"], c["seed"], c["lr"])), None)
                out += choice_numerics(c, flat_keep(), first, run)
                continue
            lines, table = choice_stability(c, flat_keep(), run)
            out += [*lines, md_table(table, list(table[0])), ""]
    if archived:
        out += ["## Runs whose layer choice was scored under bf16 (before the float32 fix)", "",
                "Until this fix dp_train scored the layers under the training's bf16 autocast. The numerics row above "
                "shows that those scores are set by bf16 rounding more than by the loss surface (a change of 1e-7 in "
                "the weights reorders them), so in these runs the layers part kept a numerically arbitrary half of "
                "the layers. They are kept here as measured (bench/rows/dpflat/full-bf16-scores/), out of the "
                "study's grids: the layers rows are to run again with the float32 scores.", "",
                md_table(archived, ["task", "method", "epsilon_target", "seed", "lr", "clip", "dev_accuracy",
                                    "test_accuracy", "test_macro_f1"]), ""]
        fa = [r for r in archived if r["method"] == "flat-all"]
        by = {(s["task"], s["method"], s["epsilon_target"]): s for s in summary}
        for t, e, sd in sorted({(r["task"], r["epsilon_target"], r["seed"]) for r in fa}):
            g = [r for r in fa if (r["task"], r["epsilon_target"], r["seed"]) == (t, e, sd)]
            lo, hi = by.get((t, "dp-sgd", e)), by.get((t, "nonprivate", None))
            if len(g) == len(grid(sc, "flat-all")) and lo and hi and hi["test_accuracy"] != lo["test_accuracy"]:
                c = chosen(g)
                closed = (c["test_accuracy"] - lo["test_accuracy"]) / (hi["test_accuracy"] - lo["test_accuracy"])
                out += [f"With these runs, flat-all on {t} at epsilon {e:g} (seed {sd}): dev chose lr {c['lr']:g} "
                        f"clip {c['clip']:g}, test {c['test_accuracy']:.4g}, closing {closed:.2f} of DP-SGD's gap "
                        "(DP-SGD's and the non-private row's means over their seeds): a figure of the arbitrary "
                        "choice, not of the flatness-guided one.", ""]
    out += ["## Every grid point (the rows of complete grids)", "",
            md_table(runs, ["task", "method", "epsilon_target", "seed", "lr", "clip", "train_loss", "dev_accuracy",
                            "test_accuracy", "test_macro_f1"]), ""]
    if missing:
        out += ["## Rows still to run", "", ", ".join(missing), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="", help="comma-separated fnmatch patterns over run keys "
                    "(task/method/eps3|nonprivate/s0/lr..-c..); default: every run")
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from the committed rows")
    a = ap.parse_args()
    sc = QUICK if a.quick else FULL
    tasks, seeds = (TASKS[:1], SEEDS[:1]) if a.quick else (TASKS, SEEDS)
    cache = RowCache("dpflat", sc["tag"], committed=True)
    pats = [p for p in a.rows.split(",") if p]

    def wanted(key: str) -> bool:
        return not a.page_only and (not pats or any(fnmatch.fnmatch(key, p) for p in pats))

    def fetch(key: str, fn) -> dict | None:
        """The cached row of `key`, measured now if it is wanted and missing."""
        hit = cache.get(key)
        if hit is None and wanted(key):
            log(key)
            hit = cache.run(key, fn)
        return hit

    rows, grid_runs, every, missing = [], [], [], []
    for task, seed, method in itertools.product(tasks, seeds, METHODS):
        for eps in ([None] if METHODS[method] is None else EPSILONS):
            runs = []
            for lr, clip in grid(sc, method):
                hit = fetch(run_key(task, method, eps, seed, lr, clip),
                            functools.partial(train_run, task, method, eps, seed, lr, clip, sc))
                if hit is not None:
                    runs.append(hit)
                    every.append(hit)
            if len(runs) == len(grid(sc, method)):
                rows.append(chosen(runs))
                grid_runs += runs
            else:
                missing.append(run_key(task, method, eps, seed, 0, 0).rsplit("/", 1)[0])
    # the layers part's controls, and the stability of its choice, at the grid point DP-SGD chose
    archive = RowCache("dpflat", f"{sc['tag']}-bf16-scores", committed=True)  # read only: runs before the fix
    archived = [{"flat_score_dtype": "bfloat16", **json.loads(f.read_text())}
                for f in sorted(archive.dir.glob("*.json"))]
    choices = []
    for ref in [r for r in rows if r["method"] == "dp-sgd"]:
        t, e, s, lr, clip = ref["task"], ref["epsilon_target"], ref["seed"], ref["lr"], ref["clip"]
        for m in CONTROLS:
            key = run_key(t, m, e, s, lr, clip)
            hit = fetch(key, functools.partial(train_run, t, m, e, s, lr, clip, sc))
            if hit is not None:
                every.append(hit)
            else:
                missing.append(key)
        if e == EPSILONS[0]:  # the choice uses public data only: one per (task, seed, lr)
            for mode in CHOICE_MODES:
                key = choice_key(t, s, lr, mode)
                hit = fetch(key, functools.partial(choice_run, t, s, lr, sc, mode))
                if hit is not None:
                    choices.append(hit)
                else:
                    missing.append(key)
    for r in every:  # the study's runs score in float32 (dp_train does since the fix; the first ones did not say so)
        if r.get("layer_sharpness_change"):
            r.setdefault("flat_score_dtype", "float32")
    summary = summarise(rows)
    text = page(summary, rows, grid_runs, missing, sc, every, choices, archived) if rows else ""
    if a.quick:
        print(text)
    elif rows:
        write_results("dpflat", rows, text, extra={"summary": summary, "partial": bool(missing),
                                                    "missing_rows": missing, "scale": sc},
                      cmd="python bench/dpflat.py")  # the rows' command, also when --page-only or --rows writes it
    else:
        log("no row measured yet: no page written")


if __name__ == "__main__":
    main()
