"""The adapter benchmark: LoRA (r = 1, 2, 8, 16), MoS (e = 2; r = 8, 16; every ablation), VeRA and VB-LoRA
(PEFT-backed kinds), on smollm2-135m, tasks rotten_tomatoes, trec and bbc_news, all linear projections targeted.

Every row goes through the same patchlm Trainer loop (same data order, steps, batch, schedule, bf16 autocast,
loss, AdamW) and the same learning-rate search: each row trains rotten_tomatoes (seed 0) at every learning rate of
the grid, keeps the one with the best validation accuracy, and uses it for the other tasks and seeds. VeRA and
VB-LoRA are the `vera` and `vblora` patch kinds (patchlm.adapters; PEFT's tuner layers do the math).

Every finished training is cached under bench/.cache/adapters/<tag>/ and the study resumes from there; the page
is rewritten after each training, so a partial run still shows what is done.

    python bench/adapters.py            # the full study (about 45-50 minutes of two quiet cores; resumable)
    python bench/adapters.py --quick    # a few minutes: 5 rows at a tiny scale, writes adapters-quick.*
    python bench/adapters.py --report   # rewrite the page from the cache only
    python bench/adapters.py --phase search --rows lora-r16   # one slice (to share the machine between jobs)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowCache, md_table, write_results

from patchlm.train.config import TrainConfig
from patchlm.train.engine import train_loop
from patchlm.train.optim import make_optimizer

MODEL = "smollm2-135m"
TASKS = ("rotten_tomatoes", "trec", "bbc_news")
MOS = {"e": 2, "p": 1, "l": 4, "targets": "all-linear"}
OFF = {"mos-no-subset": "subset_selection", "mos-no-dissociation": "pair_dissociation",
       "mos-no-sharding": "vector_sharding", "mos-no-private": "privatization"}

# name -> (patch kind, spec). LoRA and MoS use alpha = 2 x rank (scaling 2), as `patchlm train` does.
ROWS: dict[str, tuple[str, dict]] = {
    **{f"lora-r{r}": ("lora", {"r": r, "alpha": 2 * r, "targets": "all-linear"}) for r in (1, 2, 8, 16)},
    "mos-e2-r8": ("mos", {**MOS, "r": 8, "alpha": 16}),
    "mos-e2-r16": ("mos", {**MOS, "r": 16, "alpha": 32}),
    # VeRA trains r + d_out per module (two scaling vectors on frozen shared random projections). Its count
    # grows by only r per module, so reaching MoS e=2's 0.61M would need r ~ 2170 (> every hidden size, ~4x
    # the model's compute); r = 256 keeps its cost near LoRA's and trains 0.21M. See the page.
    "vera": ("vera", {"r": 256, "d_initial": 0.1}),
    # VB-LoRA: logits over a bank of 32 vectors of length 64 for every 64-long piece of A and B at r = 4:
    # 2 x (d_in + d_out) per module + the bank = LoRA r=2's count + 2,048, the MoS e=2 budget.
    "vblora": ("vblora", {"r": 4, "vector_length": 64, "num_vectors": 32, "topk": 2}),
    **{name: ("mos", {**MOS, "r": 16, "alpha": 32, flag: False}) for name, flag in OFF.items()},
    "mos-pure-sharing": ("mos", {**MOS, "r": 16, "alpha": 32, **{f: False for f in OFF.values()}}),
}
SEEDED = ("lora-r2", "lora-r16", "mos-e2-r16")  # rows with 3 seeds
LONG = ("lora-r2", "lora-r16", "mos-e2-r16")  # the headline rows again with 5x the steps (does the gap close?)
LONG_FACTOR = 5


# ---------------------------------------------------------------- the probes' training steps
# torch.optim.AdamW's own defaults (weight decay 0.01) and no clipping: what the probes were measured with
PROBE = TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=0.0, progress=False)


def probe_train(model, params, batches, on_step=None) -> int:
    """One AdamW step per batch through the engine's loop, bf16 autocast: the throughput and memory probes."""
    rule = make_optimizer("adamw", params, PROBE)
    return train_loop(model, rule, lambda s: [batches[s]], len(batches), bf16=True, on_step=on_step)


# ---------------------------------------------------------------- one training
def run_one(row: str, task_name: str, seed: int, lr: float, scale: dict, tasks: dict) -> dict:
    from patchlm.evaluate import MemoryProbe
    from patchlm.evaluate.classify import evaluate_classification
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    kind, spec = ROWS[row]
    task = tasks[task_name]
    max_len = scale["max_length"][task_name]
    base = load_base(MODEL)
    cfg = TrainConfig(steps=scale["steps"], batch_size=scale["batch_size"], lr=lr, warmup=0.1, schedule="cosine",
                      max_length=max_len, seed=seed, bf16=True, progress=False, eval_limit=scale["val_limit"])
    # validation only where the learning rate is being chosen (rotten_tomatoes, seed 0)
    t = task if (task_name == TASKS[0] and seed == 0) else replace(task, validation=[])
    trainer = Trainer(base, kind, dict(spec), t, cfg)
    gc.collect()
    with MemoryProbe() as mem:
        patch = trainer.run()
    res = evaluate_classification(base.model, base.tokenizer, task, "test", limit=scale["test_limit"],
                                  batch_size=16, bf16=True, max_length=max_len)
    with tempfile.TemporaryDirectory() as d:
        patch.save(Path(d) / "p")
        nbytes = (Path(d) / "p" / "tensors.safetensors").stat().st_size
    out = {"row": row, "task": task_name, "seed": seed, "lr": lr, "test_accuracy": res["accuracy"],
           "test_macro_f1": res["macro_f1"], "test_n": res["n"], "val_accuracy": patch.metrics.get("val_accuracy"),
           "tokens_per_s": patch.metrics["train_tokens_per_s"], "train_seconds": patch.metrics["train_seconds"],
           "peak_rss_mb": mem.peak_bytes / 2**20, "train_mem_delta_mb": mem.delta_bytes / 2**20,
           "trainable_params": sum(p.numel() for p in trainer.params), "patch_bytes": nbytes}
    trainer.kind.detach(base.model)
    del trainer, patch, base
    gc.collect()
    return out


# ---------------------------------------------------------------- speed: same batches, interleaved
def speed_probe(pairs, scale: dict, tasks: dict, reps: int, rows: list[str]) -> dict:
    """Training-step tokens/s of each row on identical rotten_tomatoes batches, the rows interleaved so
    background load hits them alike. Median over `reps` rounds of `scale['speed_steps']` steps."""
    from patchlm.models import load_base
    from patchlm.patch import get_kind

    base = load_base(MODEL)
    batches = _train_batches(base, tasks, scale)
    ntok = sum(int(b["attention_mask"].sum()) for b in batches)
    rates = {r: [] for r in rows}
    for _ in range(reps):
        for r in rows:
            kind_name, spec = ROWS[r]
            kind = get_kind(kind_name)
            kind.attach(base.model, dict(spec), seed=0)
            params = kind.trainable_parameters(base.model)
            clock = {}

            def start(info, clock=clock):  # one warm-up step, then timed steps
                if info.step == 1:
                    clock["t0"] = time.perf_counter()

            probe_train(base.model, params, [batches[0], *batches], on_step=start)
            rates[r].append(ntok / (time.perf_counter() - clock["t0"]))
            kind.detach(base.model)
    out = []
    for a, b in pairs:
        ra, rb = statistics.median(rates[a]), statistics.median(rates[b])
        out.append({"row": a, "baseline": b, "tokens_per_s": ra, "baseline_tokens_per_s": rb, "ratio": ra / rb,
                    "rounds": reps, "tokens_per_round": ntok})
    return {"pairs": out, "all": {r: statistics.median(v) for r, v in rates.items()}, "raw": rates}


def _train_batches(base, tasks, scale):
    from patchlm.data.features import build_features, collate, pad_id

    feats = build_features(tasks[TASKS[0]], "train", base.tokenizer, "classification", scale["max_length"][TASKS[0]])
    bs = scale["batch_size"]
    return [collate(feats[i * bs:(i + 1) * bs], pad_id(base.tokenizer)) for i in range(scale["speed_steps"])]


def memory_probe_child(row: str, scale: dict) -> dict:
    """In a fresh process: load the base, hand freed memory back to the OS, attach the row's adapter and run
    the probe's training steps while sampling RSS. Reports the peak during training and its rise over the
    loaded model (no allocator history from other rows)."""
    import ctypes

    from patchlm.data import load_task
    from patchlm.evaluate import MemoryProbe
    from patchlm.models import load_base
    from patchlm.patch import get_kind

    base = load_base(MODEL)
    batches = _train_batches(base, {TASKS[0]: load_task(TASKS[0], seed=0)}, scale)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    kind_name, spec = ROWS[row]
    kind = get_kind(kind_name)
    with MemoryProbe(interval=0.002) as mem:
        kind.attach(base.model, dict(spec), seed=0)
        probe_train(base.model, kind.trainable_parameters(base.model), batches)
    return {"row": row, "peak_rss_mb": mem.peak_bytes / 2**20, "loaded_rss_mb": mem.start_bytes / 2**20,
            "train_delta_mb": mem.delta_bytes / 2**20}


def memory_probe(rows, scale: dict) -> dict:
    import json
    import subprocess

    out = {}
    for r in rows:
        res = subprocess.run([sys.executable, __file__, "--memory-child", r, "--scale-json", json.dumps(scale)],
                             capture_output=True, text=True, check=True)
        out[r] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- aggregation and page
def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(runs: list[dict], chosen: dict, seeds_for) -> list[dict]:
    rows = []
    for name in ROWS:
        lr = chosen.get(name)
        if lr is None:
            continue
        mine = [r for r in runs if r["row"] == name and r["lr"] == lr]
        row = {"name": name, "method": ROWS[name][0], "lr": lr,
               "spec": {k: v for k, v in ROWS[name][1].items() if k != "targets"}}
        seeds = seeds_for(name)
        per_seed_means = []
        complete = True
        for s in seeds:
            accs = [next((r["test_accuracy"] for r in mine if r["task"] == t and r["seed"] == s), None) for t in TASKS]
            if all(a is not None for a in accs):
                per_seed_means.append(statistics.mean(accs))
                if s == seeds[0]:
                    row["seed0_mean_accuracy"] = per_seed_means[-1]
            else:
                complete = False
        for t in TASKS:
            m, sd = _mean_std([r["test_accuracy"] for r in mine if r["task"] == t and r["seed"] in seeds])
            row[f"{t}_accuracy"] = m
            row[f"{t}_std"] = sd
        m, sd = _mean_std(per_seed_means)
        row["mean_accuracy"] = m if complete else None
        row["mean_accuracy_std"] = sd if complete else None
        row["seeds"] = len(per_seed_means)
        any_run = [r for r in runs if r["row"] == name]
        rt = [r for r in any_run if r["task"] == TASKS[0]]
        row["trainable_params"] = any_run[0]["trainable_params"]
        row["patch_file_bytes"] = any_run[0]["patch_bytes"]
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rt) if rt else None
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in any_run)
        row["train_mem_delta_mb"] = max(r["train_mem_delta_mb"] for r in any_run)
        row["complete"] = complete
        rows.append(row)
    return rows


def _pm(r, key):
    m, sd = r.get(key), r.get(key.replace("_accuracy", "_std") if key != "mean_accuracy" else "mean_accuracy_std")
    if m is None:
        return "-"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if sd is not None else f"{100 * m:.1f}"


def goals(rows: list[dict], speed: list[dict]) -> list[str]:
    by = {r["name"]: r for r in rows}

    def acc(n):
        return by.get(n, {}).get("mean_accuracy")

    out = []
    mos, l16, l2 = acc("mos-e2-r16"), acc("lora-r16"), acc("lora-r2")
    if None not in (mos, l16, l2):
        ratio = by["lora-r16"]["trainable_params"] / by["mos-e2-r16"]["trainable_params"]
        gap = 100 * (mos - l16)
        out.append(f"- **MoS e=2 r=16 within 0.5 points of LoRA r=16** ({100 * mos:.1f} vs {100 * l16:.1f}, "
                   f"{gap:+.1f} points, at 1/{ratio:.0f} of its trainable parameters): "
                   f"{'met' if gap >= -0.5 else 'not met'}.")
        out.append(f"- **MoS e=2 r=16 above LoRA r=2** (same budget; {100 * mos:.1f} vs {100 * l2:.1f}): "
                   f"{'met' if mos > l2 else 'not met'}.")
    # one-seed rows are compared with full MoS at the same seed (seed 0), not with its 3-seed mean
    mos0 = by.get("mos-e2-r16", {}).get("seed0_mean_accuracy")
    mos_sd = by.get("mos-e2-r16", {}).get("mean_accuracy_std")

    def seed0(n):
        return by.get(n, {}).get("seed0_mean_accuracy")

    for peer in ("vera", "vblora"):
        if None not in (mos0, seed0(peer)):
            out.append(f"- **MoS ahead of {peer}** (seed 0: {100 * mos0:.1f} vs {100 * seed0(peer):.1f}; {peer} trains "
                       f"{by[peer]['trainable_params']:,} parameters, MoS {by['mos-e2-r16']['trainable_params']:,}): "
                       f"{'met' if mos0 > seed0(peer) else 'not met'}.")
    for s in speed:
        out.append(f"- **{s['row']} training throughput >= 0.9x {s['baseline']}** (interleaved probe): "
                   f"{s['tokens_per_s']:.0f} vs {s['baseline_tokens_per_s']:.0f} tokens/s = {s['ratio']:.2f}x: "
                   f"{'met' if s['ratio'] >= 0.9 else 'not met'}.")
    abl = [n for n in [*list(OFF), "mos-pure-sharing"] if seed0(n) is not None]
    if mos0 is not None and abl:
        below = [n for n in abl if seed0(n) < mos0]
        clear = [n for n in below if mos_sd is not None and mos0 - seed0(n) > mos_sd]
        out.append(f"- **Each ablation row below full MoS** (same seed 0; full MoS {100 * mos0:.1f}): "
                   + ", ".join(f"{n} {100 * seed0(n):.1f}" for n in abl)
                   + f": {'met' if len(below) == len(abl) else 'not met'} ({len(below)} of {len(abl)} below"
                   + (f"; {len(clear)} by more than full MoS's seed-to-seed std of {100 * mos_sd:.1f} points"
                      if mos_sd is not None else "") + ").")
    return out


def reading(rows: list[dict]) -> str:
    """What the numbers say about the headline comparison, computed from the rows."""
    by = {r["name"]: r for r in rows}
    need = ("mos-e2-r16", "lora-r16", "lora-r2")
    if not all(n in by and by[n].get("mean_accuracy") is not None for n in need):
        return ""
    m, l16, l2 = (by[n] for n in need)
    per = [(t, 100 * (m[f"{t}_accuracy"] - l16[f"{t}_accuracy"]), 100 * (m[f"{t}_accuracy"] - l2[f"{t}_accuracy"]))
           for t in TASKS]
    worst = min(per, key=lambda x: x[1])
    lines = ["- Per task, mos-e2-r16 minus lora-r16 / minus lora-r2 (3-seed means, points): "
             + "; ".join(f"{t} {a:+.1f} / {b:+.1f}" for t, a, b in per) + ".",
             (f"- The gap to LoRA r=16 sits mostly in {worst[0]} ({worst[1]:+.1f}); its seed-to-seed std is "
              f"{100 * m[f'{worst[0]}_std']:.1f} (MoS) and {100 * l16[f'{worst[0]}_std']:.1f} (LoRA r=16) points."),
             (f"- Seed-to-seed std of the three-task mean: mos-e2-r16 {100 * m['mean_accuracy_std']:.1f}, "
              f"lora-r16 {100 * l16['mean_accuracy_std']:.1f}, lora-r2 {100 * l2['mean_accuracy_std']:.1f} points.")]
    abl = [by[n]["seed0_mean_accuracy"] for n in [*list(OFF), "mos-pure-sharing"]
           if by.get(n, {}).get("seed0_mean_accuracy") is not None]
    if abl and m.get("seed0_mean_accuracy") is not None:
        spread = max(abs(a - m["seed0_mean_accuracy"]) for a in abl)
        within = spread < m["mean_accuracy_std"]
        lines.append(f"- The ablation rows (one seed each) differ from full MoS at the same seed by at most "
                     f"{100 * spread:.1f} points, " + ("less than full MoS's own seed-to-seed std, so this study "
                                                       "cannot rank the ablations (the paper's ablation trains far "
                                                       "longer)." if within else "more than full MoS's own "
                                                       "seed-to-seed std."))
    return "\n".join(lines)


def long_section(long_runs: list[dict], scale: dict) -> str:
    if not long_runs:
        return ""
    by = {(r["row"], r["task"]): r for r in long_runs}
    rows = []
    for name in LONG:
        d = {"name": name}
        accs = []
        for t in TASKS:
            hit = by.get((name, t))
            d[t] = f"{100 * hit['test_accuracy']:.1f}" if hit else "-"
            if hit:
                accs.append(hit["test_accuracy"])
        d["mean"] = f"{100 * statistics.mean(accs):.1f}" if len(accs) == len(TASKS) else "(partial)"
        d["lr"] = next((f"{r['lr']:g}" for r in long_runs if r["row"] == name), "-")
        rows.append(d)
    steps = scale["steps"] * LONG_FACTOR
    return f"""
## Longer training: the headline rows at {steps} steps

The same recipe with {LONG_FACTOR}x the optimizer steps ({steps} x batch {scale['batch_size']}), seed 0, each row's
learning rate from the search above, to see whether the gaps of the short study close with more training.

{md_table(rows, ["name", *list(TASKS), "mean", "lr"])}
"""


def write_page(runs, chosen, seeds_for, probe, scale, tag, lr_grid, suffix, long_runs=(), cmd=None, extend=()):
    rows = aggregate(runs, chosen, seeds_for)
    speed = probe.get("pairs", [])
    for r in rows:
        r["train_tokens_per_s"] = r.pop("tokens_per_s")
        r["tokens_per_s"] = probe.get("all", {}).get(r["name"], r["train_tokens_per_s"])
        mem = probe.get("memory", {}).get(r["name"])
        r["peak_memory_mb"] = mem["peak_rss_mb"] if mem else None
        r["train_memory_delta_mb"] = mem.get("train_delta_mb") if mem else None
    cols = ["name", "method", "trainable_params", "patch_file_bytes"] + [f"{t}" for t in TASKS] + \
           ["mean", "tokens_per_s", "train_tokens_per_s", "peak_memory_mb", "train_memory_delta_mb", "lr"]
    table_rows = []
    for r in rows:
        d = dict(r)
        for t in TASKS:
            d[t] = _pm(r, f"{t}_accuracy")
        d["mean"] = _pm(r, "mean_accuracy") if r["complete"] else "(partial)"
        table_rows.append(d)
    fmt = {"trainable_params": lambda v: f"{v:,}", "patch_file_bytes": lambda v: f"{v:,}",
           "tokens_per_s": lambda v: f"{v:.0f}", "train_tokens_per_s": lambda v: f"{v:.0f}",
           "peak_memory_mb": lambda v: f"{v:.0f}", "train_memory_delta_mb": lambda v: f"{v:.0f}",
           "lr": lambda v: f"{v:g}"}
    search = [r for r in runs if r["task"] == TASKS[0] and r["seed"] == 0]
    lr_rows = []
    for name in ROWS:
        d = {"name": name}
        for lr in tuple(lr_grid) + tuple(extend):
            hit = next((r for r in search if r["row"] == name and r["lr"] == lr), None)
            d[f"lr {lr:g}"] = (f"{100 * hit['val_accuracy']:.1f} (test {100 * hit['test_accuracy']:.1f})"
                               if hit and hit["val_accuracy"] is not None else "-")
        d["chosen"] = f"{chosen[name]:g}" if name in chosen else "-"
        lr_rows.append(d)
    mem_base = min((m["loaded_rss_mb"] for m in probe.get("memory", {}).values()), default=None)
    md = f"""
Adapters on **{MODEL}** (all 7 linear projections of all 30 layers), classification by label log-likelihood.

**Scale used ({tag})**: {scale['steps']} optimizer steps x batch {scale['batch_size']} (AdamW, warm-up 10%, cosine),
bf16 autocast for every row, max length per task {scale['max_length']} tokens (prompts are cut from the left, so
the question survives); test accuracy on the first {scale['test_limit']} test examples of each task; learning rate
chosen per row from {list(lr_grid)} (extended upward through {list(extend)} one rate at a time while a row's best
is the highest rate it tried) by validation accuracy (first {scale['val_limit']} validation examples) on
{TASKS[0]} with seed 0, then used for every task and seed. Rows `{'`, `'.join(SEEDED)}` are mean ± std over seeds
{list(seeds_for(SEEDED[0]))} (seed: init, data order, MoS indices; the data split is fixed); the others are seed 0.
The mean column is the mean over the three tasks (± its std over seeds). This is a small study sized for two
shared CPU cores (papers train thousands of steps): with {scale['test_limit']} test examples one accuracy has a
standard error of about 3 points, so gaps of a point or two between rows are within noise.

Columns: trainable parameters; patch file bytes (the saved `tensors.safetensors`: MoS stores pools + int16 indices,
VeRA's frozen projections regenerate from PEFT's PRNG key, VB-LoRA stores its logits and bank); accuracy in %;
tokens/s = training throughput on identical {TASKS[0]} batches with all rows interleaved (median of
{probe.get('rounds', '?')} rounds of {scale['speed_steps']} steps; background load hits every row alike);
train_tokens_per_s = the median over the row's own {TASKS[0]} trainings (more exposed to other jobs on the
machine); peak memory = peak RSS (sampled every 2 ms) of a fresh process that loads the base, returns freed
memory to the OS and runs {scale['speed_steps']} training steps of the row; train_memory_delta_mb = that peak minus
the RSS before the adapter was attached (the loaded fp32 model: {mem_base or 0:.0f} MB).

{md_table(table_rows, cols, fmt)}

## Goals

{chr(10).join(goals(rows, speed)) or '- (not enough rows finished yet)'}

## What the numbers show

{reading(rows) or '(not enough rows finished yet)'}

## Throughput probe: MoS against LoRA at the same r

{md_table(speed, ['row', 'baseline', 'tokens_per_s', 'baseline_tokens_per_s', 'ratio', 'rounds'],
          {'tokens_per_s': lambda v: f'{v:.0f}', 'baseline_tokens_per_s': lambda v: f'{v:.0f}',
           'ratio': lambda v: f'{v:.3f}'}) if speed else '(not run)'}

{long_section(list(long_runs), scale)}
## Learning-rate search ({TASKS[0]} validation accuracy %, seed 0; test accuracy in brackets)

{md_table(lr_rows, ['name'] + [f'lr {lr:g}' for lr in tuple(lr_grid) + tuple(extend)] + ['chosen'])}

## Rows

- `lora-rK`: LoRA rank K, alpha 2K. `mos-e2-rR`: MoS with e=2 (LoRA r=2's trainable count), r=R, p=1, l=4,
  alpha 2R. Ablations from `mos-e2-r16`, same pools (same trainable count): `mos-no-subset` every layer uses the
  same public shards; `mos-no-dissociation` B uses A's indices; `mos-no-sharding` l=1 (whole vectors);
  `mos-no-private` p=0; `mos-pure-sharing` all four off.
- `vera`: PEFT VeRA, r=256, d_initial 0.1: trains r + d_out per module. Its count grows by only r per module, so
  matching MoS e=2's budget would take r ~ 2170 (beyond every hidden size, about 4x the model's compute); at
  r=256 it trains about a third of MoS's parameters at a compute cost near LoRA's. This is VeRA's budget ceiling
  in practice, not a tuned handicap.
- `vblora`: PEFT VB-LoRA, r=4, bank of 32 vectors of length 64, top-2: trains LoRA r=2's count + 2,048 (the MoS
  e=2 budget); its saved logits could shrink to top-k indices, which this page does not do.
"""
    write_results("adapters", rows, md, extra={"scale": scale, "lr_grid": list(lr_grid), "lr_extend": list(extend),
                                                "chosen_lr": chosen,
                                                "probe": probe, "runs": runs, "long_runs": list(long_runs)},
                  suffix=suffix, cmd=cmd)


# ---------------------------------------------------------------- main
def main(argv=None):
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny scale, a few minutes; writes adapters-quick.*")
    ap.add_argument("--report", action="store_true", help="only rewrite the page from cached runs")
    ap.add_argument("--rows", default=None, help="train only these rows (comma-separated); the page shows all cached")
    ap.add_argument("--phase", choices=["all", "probe", "search", "tasks", "seeds", "long"], default="all",
                    help="run one phase only (each resumes from the cache)")
    ap.add_argument("--lr-grid", default=None, help="learning rates searched (comma-separated) instead of the default")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_probe_child(args.memory_child, json.loads(args.scale_json))))
        return
    if args.quick:
        scale = {"steps": 8, "batch_size": 4, "test_limit": 24, "val_limit": 16, "speed_steps": 3,
                 "max_length": {"rotten_tomatoes": 64, "trec": 64, "bbc_news": 64}}
        lr_grid, seeds, reps, tag, suffix = (2e-3,), (0, 1), 1, "quick", "-quick"
        rows = ["lora-r2", "mos-e2-r16", "vera", "vblora", "mos-pure-sharing"]
    else:
        # sized to about 45-50 minutes of two quiet cores (~450 training tokens/s in bf16)
        scale = {"steps": 30, "batch_size": 8, "test_limit": 200, "val_limit": 100, "speed_steps": 6,
                 "max_length": {"rotten_tomatoes": 96, "trec": 96, "bbc_news": 80}}
        lr_grid, seeds, reps, tag, suffix = (1e-3, 5e-3, 2e-2), (0, 1, 2), 3, "full", ""
        rows = list(ROWS)
    # a row whose best rate is the highest one tried gets the next of these, one at a time (same rule for all)
    extend = () if args.quick else (5e-2, 1e-1)
    if args.lr_grid:
        lr_grid = tuple(float(x) for x in args.lr_grid.split(","))
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",")]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            ap.error(f"unknown rows {unknown}; choices: {', '.join(ROWS)}")
    key_tag = f"{tag}-s{scale['steps']}-t{scale['test_limit']}"
    cache = RowCache("adapters", key_tag, committed=True)
    shown = list(ROWS) if not args.quick else rows

    def seeds_for(name):
        return seeds if name in SEEDED else seeds[:1]

    from patchlm.data import load_task

    tasks = {t: load_task(t, seed=0) for t in TASKS}
    runs: list[dict] = []
    chosen: dict[str, float] = {}

    def key(row, task, seed, lr):
        return f"{row}__{task}__s{seed}__lr{lr:g}"

    grid_all = tuple(lr_grid) + tuple(extend)

    def search_next(name) -> float | None:
        """The next learning rate the row's search needs (None when its search is finished)."""
        tried = []
        for i, lr in enumerate(grid_all):
            hit = cache.get(key(name, TASKS[0], 0, lr))
            if hit is None:
                if i < len(lr_grid) or (tried and best_of(tried)["lr"] == tried[-1]["lr"]):
                    return lr
                return None
            tried.append(hit)
        return None

    def best_of(search):
        return max(search, key=lambda r: (r["val_accuracy"] or 0.0, -r["lr"]))

    def collect():
        runs.clear()
        chosen.clear()
        for name in shown:
            for t in TASKS:
                for s in seeds:
                    for lr in grid_all:
                        hit = cache.get(key(name, t, s, lr))
                        if hit:
                            runs.append(hit)
            search = [r for r in runs if r["row"] == name and r["task"] == TASKS[0] and r["seed"] == 0]
            if search and search_next(name) is None:
                chosen[name] = best_of(search)["lr"]

    long_scale = {**scale, "steps": scale["steps"] * LONG_FACTOR}

    def long_key(row, task, lr):
        return f"long{long_scale['steps']}__{row}__{task}__s0__lr{lr:g}"

    def page():
        collect()
        long_runs = [h for n in LONG if n in chosen for t in TASKS if (h := cache.get(long_key(n, t, chosen[n])))]
        # every phase resumes the same cached study: the page names the command that measures all of it
        cmd = ("python bench/adapters.py" + (" --quick" if args.quick else "")
               + (f" --lr-grid {args.lr_grid}" if args.lr_grid else ""))
        write_page(runs, dict(chosen), seeds_for, cache.get("probe") or {}, scale, key_tag, lr_grid, suffix,
                   long_runs, cmd=cmd, extend=extend)

    if args.report:
        page()
        return
    t_start = time.time()

    # 1. throughput (interleaved, same batches) and memory (fresh process per row) probes, cached
    if args.phase in ("all", "probe") and cache.get("probe") is None:
        pairs = ([("mos-e2-r16", "lora-r16"), ("mos-e2-r8", "lora-r8")] if not args.quick
                 else [("mos-e2-r16", "lora-r2")])
        probe_rows = shown
        sp = speed_probe(pairs, scale, tasks, reps, probe_rows)
        mem = memory_probe(probe_rows, scale)
        cache.put("probe", {"pairs": sp["pairs"], "all": sp["all"], "raw": sp["raw"], "rounds": reps, "memory": mem})
        page()
        print(f"[{time.time() - t_start:6.0f}s] probes", flush=True)

    # 2. learning-rate search on the first task, 3. the other tasks, 4. the extra seeds
    if args.phase in ("all", "search"):
        for n in rows:
            while (lr := search_next(n)) is not None:
                item = (n, TASKS[0], 0, lr)
                cache.run(key(*item), lambda item=item: run_one(*item, scale, tasks))
                page()
                print(f"[{time.time() - t_start:6.0f}s] {key(*item)}", flush=True)
    collect()
    later = []
    if args.phase in ("all", "tasks"):
        later += [(n, t, 0) for n in rows for t in TASKS[1:]]
    if args.phase in ("all", "seeds"):
        later += [(n, t, s) for s in seeds[1:] for n in rows if n in SEEDED for t in TASKS]
    for n, t, s in later:
        if n not in chosen:
            print(f"skip {n} {t} s{s}: its learning-rate search is not finished", flush=True)
            continue
        lr = chosen[n]
        cache.run(key(n, t, s, lr), lambda n=n, t=t, s=s, lr=lr: run_one(n, t, s, lr, scale, tasks))
        page()
        print(f"[{time.time() - t_start:6.0f}s] {key(n, t, s, lr)}", flush=True)
    if args.phase in ("all", "long") and not args.quick:
        for n in (r for r in LONG if r in rows):
            if n not in chosen:
                print(f"skip long {n}: its learning-rate search is not finished", flush=True)
                continue
            for t in TASKS:
                lr = chosen[n]
                cache.run(long_key(n, t, lr), lambda n=n, t=t, lr=lr: run_one(n, t, 0, lr, long_scale, tasks))
                page()
                print(f"[{time.time() - t_start:6.0f}s] {long_key(n, t, lr)}", flush=True)
    page()


if __name__ == "__main__":
    main()
