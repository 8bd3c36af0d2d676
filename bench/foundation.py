"""Foundation benchmark: patchlm LoRA vs PEFT LoRA (training tokens/s, peak memory) and base vs LoRA accuracy.

    python bench/foundation.py            # full study (about 20 minutes on 2 cores)
    python bench/foundation.py --quick    # smoke run

Speed/memory: the same model, data, loss and optimizer loop; only the LoRA implementation differs (patchlm's
LoraLinear vs PEFT's get_peft_model). Each measurement runs in its own subprocess (clean peak RSS), alternating
the two implementations, and the median of the repeats is reported with the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RowCache, md_table, write_results

MODEL = "smollm2-135m"
TASKS = ["rotten_tomatoes", "trec", "bbc_news"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _speed_rule():
    """The speed runs' step rule: torch.optim.AdamW's own defaults (weight decay 0.01), lr 1e-4, no clipping."""
    from patchlm.train.config import TrainConfig

    return TrainConfig(lr=1e-4, weight_decay=0.01, max_grad_norm=0.0, progress=False)


def timed_training(model, params, feats: list[dict], pad: int, batch: int, steps: int, bf16: bool):
    """3 warm-up steps, then `steps` timed steps (AdamW through the engine's loop, one batch of `batch` features
    per step): (tokens trained in the timed steps, their seconds, the memory probe around them)."""
    from patchlm.data.features import collate
    from patchlm.evaluate import MemoryProbe
    from patchlm.train.engine import train_loop
    from patchlm.train.optim import make_optimizer

    rule = make_optimizer("adamw", params, _speed_rule())

    def batches(i):
        return [collate(feats[i * batch:(i + 1) * batch], pad)]

    train_loop(model, rule, batches, 3, bf16=bf16)  # warm-up (allocator, autocast caches)
    count = {"tokens": 0}

    def tally(info):
        count["tokens"] += info.tokens

    with MemoryProbe() as mem:
        t0 = time.perf_counter()
        train_loop(model, rule, batches, steps + 3, start=3, bf16=bf16, on_step=tally)
        secs = time.perf_counter() - t0
    return count["tokens"], secs, mem


def speed_worker(impl: str, steps: int, batch: int, bf16: bool, rank: int) -> dict:
    """Train `steps` LoRA steps with one implementation; print tokens/s and memory (runs in a subprocess)."""
    import torch

    from patchlm.data import load_task
    from patchlm.data.features import build_features, pad_id
    from patchlm.models import load_base

    torch.manual_seed(0)
    base = load_base(MODEL)
    model = base.model
    if impl == "patchlm":
        from patchlm.patch import get_kind

        kind = get_kind("lora")
        kind.attach(model, {"r": rank, "alpha": 2 * rank, "targets": TARGETS})
        params = kind.trainable_parameters(model)
    else:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        model = peft_model.base_model.model  # the same LlamaForCausalLM, with PEFT's LoRA layers inside
        params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    task = load_task("rotten_tomatoes")
    feats = build_features(task, "train", base.tokenizer, "classification", 128)[: batch * (steps + 3)]
    tokens, secs, mem = timed_training(model, params, feats, pad_id(base.tokenizer), batch, steps, bf16)
    return {"impl": impl, "tokens_per_s": tokens / secs, "peak_rss_mb": mem.peak_bytes / 2**20,
            "train_delta_mb": mem.delta_bytes / 2**20, "trainable_params": n_params}


def run_speed(args, cache: RowCache) -> list[dict]:
    results = {"patchlm": [], "peft": []}
    for rep in range(args.repeats):
        for impl in (["patchlm", "peft"] if rep % 2 == 0 else ["peft", "patchlm"]):
            key = f"speed-{impl}-{rep}-b{args.batch}-s{args.speed_steps}-bf16{int(args.bf16)}"

            def go(impl=impl):
                out = subprocess.run([sys.executable, __file__, "--worker", impl,
                                      "--speed-steps", str(args.speed_steps),
                                      "--batch", str(args.batch)] + (["--bf16"] if args.bf16 else ["--fp32"]),
                                     capture_output=True, text=True, check=True)
                return json.loads(out.stdout.strip().splitlines()[-1])

            results[impl].append(cache.run(key, go))
    rows = []
    for impl, rs in results.items():
        rows.append({"name": f"lora-{impl}", "impl": impl,
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "train_delta_mb": statistics.median(r["train_delta_mb"] for r in rs),
                     "trainable_params": rs[0]["trainable_params"], "repeats": len(rs),
                     "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs]})
    p, q = rows
    p["speed_ratio_vs_peft"] = p["tokens_per_s"] / q["tokens_per_s"]
    p["memory_ratio_vs_peft"] = p["peak_rss_mb"] / q["peak_rss_mb"]
    p["delta_ratio_vs_peft"] = p["train_delta_mb"] / q["train_delta_mb"]
    return rows


def run_accuracy(args, cache: RowCache) -> list[dict]:
    from patchlm.data import load_task
    from patchlm.evaluate import evaluate_classification
    from patchlm.models import load_base
    from patchlm.patch import Patch
    from patchlm.train import TrainConfig, Trainer

    rows = []
    for task_name in TASKS:
        def go(task_name=task_name):
            task = load_task(task_name)
            base = load_base(MODEL)
            before = evaluate_classification(base.model, base.tokenizer, task, limit=args.limit, bf16=args.bf16)
            cfg = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, bf16=args.bf16, max_length=256,
                              eval_limit=200, save_every=50, progress=False)
            out = CACHE / "foundation" / f"patch-{task_name}-{args.steps}"
            resume = (out / "checkpoints" / "last" / "state.json").exists()
            t0 = time.perf_counter()
            patch = Trainer(base, "lora", {"r": 8, "alpha": 16, "targets": "all-linear"}, task, cfg, out_dir=out,
                            resume=resume, force=not resume).run()
            train_s = time.perf_counter() - t0
            after = evaluate_classification(base.model, base.tokenizer, task, limit=args.limit, bf16=args.bf16)
            return {"name": f"lora-r8-{task_name}", "task": task_name, "base_accuracy": before["accuracy"],
                    "lora_accuracy": after["accuracy"], "base_macro_f1": before["macro_f1"],
                    "lora_macro_f1": after["macro_f1"], "test_examples": after["n"], "steps": args.steps,
                    "train_seconds": train_s, "train_tokens_per_s": patch.metrics["train_tokens_per_s"],
                    "trainable_params": Patch.load(out / "patch").trainable_params}

        rows.append(cache.run(f"acc-{task_name}-s{args.steps}-l{args.limit}", go))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["patchlm", "peft"])
    ap.add_argument("--speed-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--bf16", dest="bf16", action="store_true", default=True)
    ap.add_argument("--fp32", dest="bf16", action="store_false")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(speed_worker(args.worker, args.speed_steps, args.batch, args.bf16, 8)))
        return
    if args.quick:
        args.speed_steps, args.repeats, args.steps, args.limit = 4, 1, 10, 40
    cache = RowCache("foundation", "quick" if args.quick else "full")
    speed = run_speed(args, cache)
    acc = run_accuracy(args, cache)
    p, q = speed
    mean_base = statistics.mean(r["base_accuracy"] for r in acc)
    mean_lora = statistics.mean(r["lora_accuracy"] for r in acc)
    faster = p["speed_ratio_vs_peft"] >= 1.0
    leaner = p["peak_rss_mb"] <= q["peak_rss_mb"]
    md = f"""
## LoRA training speed and memory: patchlm vs PEFT (same run)

smollm2-135m, LoRA r=8 alpha=16 on all 7 linear projections, rotten_tomatoes batches of {args.batch} (max 128
tokens), AdamW, {'bf16 autocast' if args.bf16 else 'fp32'}, {args.speed_steps} timed steps after 3 warm-up steps,
each run in a fresh subprocess, {args.repeats} repeats alternating the order; medians.

{md_table(speed, ["name", "trainable_params", "tokens_per_s", "peak_rss_mb", "train_delta_mb", "all_tokens_per_s"])}

patchlm / PEFT: speed **{p['speed_ratio_vs_peft']:.3f}x**, peak memory **{p['memory_ratio_vs_peft']:.3f}x**
(memory above the pre-training resident size: {p['delta_ratio_vs_peft']:.3f}x).
Goal (at least as fast, no more memory): speed {'met' if faster else 'NOT met'}, \
peak memory {'met' if leaner else 'NOT met'}
{'' if p['delta_ratio_vs_peft'] <= 1 else '(the training-time increment alone is '
    + f"{100 * (p['delta_ratio_vs_peft'] - 1):.0f}"
    + '% above PEFT, within sampling noise of a 5 ms RSS sampler but not below it)'}.
peak_rss_mb is the process's peak resident memory during the timed steps (model + activations + optimizer);
train_delta_mb the part above the resident size when timing started. The machine is shared and noisy: ratios
within a few percent are ties.

## Test accuracy: base vs LoRA patch

LoRA r=8 alpha=16 all-linear, {args.steps} steps, batch 8, lr {args.lr}, cosine schedule, best of validation
checks kept, {'bf16' if args.bf16 else 'fp32'}; first {args.limit} test examples of each task's fixed split (bbc_news
has 213); label log-likelihood scoring.

{md_table(acc, ["task", "base_accuracy", "lora_accuracy", "base_macro_f1", "lora_macro_f1", "test_examples",
               "train_seconds", "train_tokens_per_s"])}

Mean accuracy: base {mean_base:.3f}, LoRA {mean_lora:.3f} ({100 * (mean_lora - mean_base):+.1f} points).
"""
    write_results("foundation" + ("-quick" if args.quick else ""), speed + acc, md)
    print(md)


if __name__ == "__main__":
    main()
