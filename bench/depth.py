"""Depth study: LLM-Drop (attention / MLP / block drops, ours vs the consecutive-block baseline) and MindSkip
routers on smollm2-135m (30 layers): quality, prefill and decode speed, KV-cache bytes.

    python bench/depth.py            # full study (~40 minutes on 2 cores; resumes from bench/.cache/depth/)
    python bench/depth.py --quick    # smoke run (a few minutes)

Every row is the same base model with one depth patch applied (nothing re-loaded between rows):
  * perplexity on held-out news_corpus text (test split; the drop plans are scored on its train split);
  * accuracy on rotten_tomatoes, trec, bbc_news with a LoRA patch per task trained once on the *full* model and
    cached; the depth patch is applied on top of it (drop / route the fine-tuned model);
  * speed, measured interleaved with the full model in the same process (full, row, full, row, ...; medians):
    prefill tokens/s (batch 8 x 128 tokens, logits for the last position only, as generate does) and greedy
    decode tokens/s at batch 1 and 8 (32-token prompt, 32 new tokens, KV cache), plus the KV-cache bytes after
    decoding at batch 8. Prompts are held-out sharegpt conversations (the instruct model's own format).
All rows use bf16 autocast.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RowCache, md_table, write_results

from patchlm.depth.config import DropConfig, SkipConfig

MODEL = "smollm2-135m"
TASKS = ["rotten_tomatoes", "trec", "bbc_news"]

FULL = dict(limit=200, bbc_limit=100, lora_steps={"rotten_tomatoes": 120, "trec": 120, "bbc_news": 80},
            calib_samples=DropConfig.samples, calib_len=DropConfig.seq_len, ppl_blocks=16, router_samples=1000,
            router_len=128, repeats=5,
            attn=[2, 4, 8, 15], mlp=[2, 4], blocks=[4, 8], joint=[8], capacities=[0.75, 0.5, 0.25])
QUICK = dict(limit=24, bbc_limit=12, lora_steps={"rotten_tomatoes": 10, "trec": 10, "bbc_news": 6},
             calib_samples=4, calib_len=128, ppl_blocks=2, router_samples=32, router_len=64, repeats=1,
             attn=[8], mlp=[], blocks=[4], joint=[], capacities=[0.5])


def autocast():
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------- cached artifacts
def lora_patch(task_name: str, steps: int, tag: str):
    """A LoRA patch for the task, trained on the full model once and cached."""
    from patchlm.data import load_task
    from patchlm.models import load_base
    from patchlm.patch import Patch
    from patchlm.train import TrainConfig, Trainer

    d = CACHE / "depth" / tag / f"lora-{task_name}"
    if (d / "patch" / "patch.json").exists():
        return Patch.load(d / "patch")
    base = load_base(MODEL)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, max_length=256, bf16=True, eval_limit=50, save_every=1000,
                      progress=False)
    t0 = time.perf_counter()
    p = Trainer(base, "lora", {"r": 8, "alpha": 16, "targets": "all-linear"}, load_task(task_name), cfg,
                out_dir=d, force=True).run()
    print(f"  LoRA {task_name}: {steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    return p


def router_patch(base, capacity: float, o: dict, tag: str):
    """MindSkip routers trained with a capacity target (cached)."""
    from patchlm.data import load_task
    from patchlm.depth.skip import RouterKind, train_routers
    from patchlm.patch import Patch

    d = CACHE / "depth" / tag / f"router-{int(capacity * 100)}"
    if (d / "patch.json").exists():
        return Patch.load(d)
    cfg = SkipConfig(samples=o["router_samples"], max_length=o["router_len"], lam=2.0, target=capacity, bf16=True)
    t0 = time.perf_counter()
    p = train_routers(base, load_task("sharegpt"), None, "sequence", cfg)
    RouterKind().detach(base.model)
    print(f"  routers (capacity {capacity}): {p.metrics} in {time.perf_counter() - t0:.0f}s", flush=True)
    p.save(d, force=True)
    return p


# ---------------------------------------------------------------- measurements
def prompts(tok, n: int, length: int):
    """Held-out sharegpt conversations as token blocks [n, length]."""
    import torch

    from patchlm.data import load_task
    from patchlm.data.features import example_text

    t = load_task("sharegpt")
    out = []
    for e in t.split("test"):
        ids = tok(example_text(t, e, tok), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return torch.tensor(out)


def prefill_time(model, ids) -> float:
    import torch

    with torch.no_grad(), autocast():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def decode(model, ids, new: int) -> tuple[float, int]:
    """Seconds for `new` greedy steps after the prefill (cache on), and the cache bytes at the end."""
    import torch

    from patchlm.depth.drop import kv_cache_bytes

    with torch.no_grad(), autocast():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0, kv_cache_bytes(cache)


def speeds(model, on, off, pre_ids, dec_ids, repeats: int) -> dict:
    """Interleaved full/row timings (medians) of prefill and decode at batch 1 and 8."""
    res = {"full": {"pre": [], "d1": [], "d8": []}, "row": {"pre": [], "d1": [], "d8": []}}
    kv = {}
    for which in ("full", "row"):  # warm-up
        (off if which == "full" else on)()
        prefill_time(model, pre_ids[:2, :32])
        decode(model, dec_ids[:1], 2)
    for _ in range(repeats):
        for which in ("full", "row"):
            (off if which == "full" else on)()
            res[which]["pre"].append(prefill_time(model, pre_ids))
            res[which]["d1"].append(decode(model, dec_ids[:1], 32)[0])
            t, kv[which] = decode(model, dec_ids, 32)
            res[which]["d8"].append(t)
    off()
    pre_tok, d1_tok, d8_tok = pre_ids.numel(), 32, 32 * dec_ids.shape[0]
    out = {}
    for which in ("full", "row"):
        r = res[which]
        out[which] = {"prefill_tokens_per_s": pre_tok / statistics.median(r["pre"]),
                      "decode_tokens_per_s": d1_tok / statistics.median(r["d1"]),
                      "decode_b8_tokens_per_s": d8_tok / statistics.median(r["d8"]),
                      "kv_cache_bytes": kv[which],
                      "best_prefill_tokens_per_s": pre_tok / min(r["pre"]),
                      "best_decode_tokens_per_s": d1_tok / min(r["d1"]),
                      "best_decode_b8_tokens_per_s": d8_tok / min(r["d8"])}
    return out


def speed_columns(sp: dict) -> dict:
    """Row speed numbers, their ratios to the interleaved full model, and the full model's own numbers."""
    return {**sp["row"], **{f"{k}_ratio": sp["row"][k] / sp["full"][k] for k in sp["row"]},
            "full_speed_same_run": sp["full"]}


def quality(base, loras: dict, on, off, o: dict) -> dict:
    """Perplexity (no LoRA) and accuracy per task (task LoRA + depth patch)."""
    from patchlm.data import load_task
    from patchlm.data.features import example_text
    from patchlm.evaluate import evaluate_classification, perplexity
    from patchlm.patch import get_kind

    news = load_task("news_corpus")
    texts = [example_text(news, e, base.tokenizer) for e in news.split("test")[:200]]
    on()
    ppl = perplexity(base.model, base.tokenizer, texts, block_size=256, batch_size=4,
                     max_tokens=o["ppl_blocks"] * 256, bf16=True)["perplexity"]
    off()
    accs = {}
    for name in TASKS:
        t = load_task(name)
        loras[name].apply(base)
        on()
        lim = o["bbc_limit"] if name == "bbc_news" else o["limit"]
        accs[name] = evaluate_classification(base.model, base.tokenizer, t, limit=lim, bf16=True, max_length=256,
                                             batch_size=8)["accuracy"]
        off()
        get_kind("lora").detach(base.model)
    return {"perplexity": ppl, **{f"acc_{k}": v for k, v in accs.items()},
            "mean_accuracy": sum(accs.values()) / len(accs)}


# ---------------------------------------------------------------- the study
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few examples, small calibration, one router")
    ap.add_argument("--only", help="comma-separated row names to (re)run; others come from the cache")
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from the cached rows only")
    ap.add_argument("--respeed", action="store_true",
                    help="re-measure the speed columns of cached rows (same plans and routers), keep their quality")
    args = ap.parse_args()
    o = QUICK if args.quick else FULL
    tag = "quick" if args.quick else "full"
    if args.page_only:  # rebuild the page from the cached rows (no model loaded)
        cache = RowCache("depth", tag)
        names = [n for n in row_names(o) if cache.get(n) is not None]
        sys.argv = [a for a in sys.argv if a != "--page-only"]  # the page names the command that measures
        write_page([cache.get(n) for n in names], o, tag)
        return

    import torch

    from patchlm.depth.drop import DropKind, drop_patch, make_plan
    from patchlm.depth.scores import calibration_blocks
    from patchlm.depth.skip import RouterKind, route_stats
    from patchlm.models import load_base

    torch.manual_seed(0)
    cache = RowCache("depth", tag)
    print("LoRA patches (trained once on the full model, cached)", flush=True)
    loras = {t: lora_patch(t, o["lora_steps"][t], tag) for t in TASKS}
    base = load_base(MODEL)
    model = base.model
    calib = calibration_blocks(base.tokenizer, DropConfig.calib, o["calib_samples"], o["calib_len"])
    pre_ids = prompts(base.tokenizer, 8, 128)
    dec_ids = pre_ids[:, :32]

    specs: list[tuple[str, dict]] = [("full", {"kind": "none"})]
    specs += [(f"drop-attn-{n}", {"kind": "drop", "method": "one-shot", "attn": n}) for n in o["attn"]]
    if 8 in o["attn"]:
        specs.append(("drop-attn-8-iterative", {"kind": "drop", "method": "iterative", "attn": 8}))
    specs += [(f"drop-mlp-{n}", {"kind": "drop", "method": "one-shot", "mlp": n}) for n in o["mlp"]]
    specs += [(f"drop-joint-{n}", {"kind": "drop", "method": "joint", "modules": n}) for n in o["joint"]]
    for n in o["blocks"]:
        specs.append((f"drop-block-{n}", {"kind": "drop", "method": "one-shot", "blocks": n}))
        specs.append((f"consecutive-block-{n}", {"kind": "drop", "method": "consecutive", "blocks": n}))
    specs += [(f"mindskip-cap{int(c * 100)}", {"kind": "router", "capacity": c}) for c in o["capacities"]]
    only = set(args.only.split(",")) if args.only else None

    rows = []
    for name, s in specs:
        if only is not None and name not in only and cache.get(name) is not None:
            rows.append(cache.get(name))
            continue
        if only is not None and name in only:
            cache._f(name).unlink(missing_ok=True)

        def compute(name=name, s=s) -> dict:
            t0 = time.perf_counter()
            extra = {}
            if s["kind"] == "none":
                on = off = lambda: None
            elif s["kind"] == "drop":
                plan, scores = make_plan(model, calib, s["method"], attn=s.get("attn", 0), mlp=s.get("mlp", 0),
                                         blocks=s.get("blocks", 0), modules=s.get("modules", 0), bf16=True)
                p = drop_patch(base, plan, scores, s["method"], {"task": DropConfig.calib})
                kind = DropKind()
                def on():
                    return kind.attach(model, p.spec)
                def off():
                    return kind.detach(model)
                extra = {"method": s["method"], "dropped_attention": plan["attention"], "dropped_mlp": plan["mlp"],
                         "dropped_blocks": plan["block"]}
            else:
                p = router_patch(base, s["capacity"], o, tag)
                kind = RouterKind()
                seen: list[float] = []
                collecting = [True]

                def on(p=p, kind=kind):
                    kind.attach(model, dict(p.spec), p.tensors)

                def off(kind=kind, seen=seen, collecting=collecting):
                    if collecting[0] and route_stats(model):
                        seen.extend(v for v in route_stats(model).values() if not math.isnan(v))
                    kind.detach(model)

                extra = router_facts(p, s)
            q = quality(base, loras, on, off, o)
            if s["kind"] == "router":
                collecting[0] = False
                extra["attn_executed"] = sum(seen) / max(1, len(seen))
            sp = speeds(model, on, off, pre_ids, dec_ids, o["repeats"])
            row = {"name": name, **q, **speed_columns(sp), **extra, "speed_repeats": o["repeats"],
                   "seconds": time.perf_counter() - t0}
            print(f"  {name}: acc {row['mean_accuracy']:.3f} ppl {row['perplexity']:.2f} "
                  f"prefill x{row['prefill_tokens_per_s_ratio']:.2f} decode x{row['decode_tokens_per_s_ratio']:.2f} "
                  f"kv x{row['kv_cache_bytes_ratio']:.2f} ({row['seconds']:.0f}s)", flush=True)
            return row

        hit = cache.get(name)
        if hit is not None and args.respeed:
            hit = respeed(hit, s, model, base, pre_ids, dec_ids, o, tag, cache)
        rows.append(hit if hit is not None else cache.run(name, compute))
    write_page(rows, o, tag)


def row_names(o: dict) -> list[str]:
    names = ["full"] + [f"drop-attn-{n}" for n in o["attn"]] + (["drop-attn-8-iterative"] if 8 in o["attn"] else [])
    names += [f"drop-mlp-{n}" for n in o["mlp"]] + [f"drop-joint-{n}" for n in o["joint"]]
    for n in o["blocks"]:
        names += [f"drop-block-{n}", f"consecutive-block-{n}"]
    return names + [f"mindskip-cap{int(c * 100)}" for c in o["capacities"]]


def findings(by: dict) -> list[str]:
    """Plain statements computed from the rows (so a re-run rewrites them with its own numbers)."""
    out = []
    full = by["full"]
    a8, m2 = by.get("drop-attn-8"), by.get("drop-mlp-2")
    if a8 and m2:
        out.append(f"- Attention is much more redundant than the MLP: dropping 8 attention layers raises perplexity "
                   f"{full['perplexity']:.1f} -> {a8['perplexity']:.1f}, dropping only 2 MLPs already to "
                   f"{m2['perplexity']:.1f}. Mean accuracy (with each task's LoRA) keeps "
                   + ", ".join(f"{100 * by[n]['accuracy_retained']:.1f}% at {n}" for n in
                               ("drop-attn-2", "drop-attn-4", "drop-attn-8", "drop-attn-15") if n in by) + ".")
    it, jo = by.get("drop-attn-8-iterative"), by.get("drop-joint-8")
    if a8 and it and jo:
        same_it = it["dropped_attention"] == a8["dropped_attention"]
        same_jo = jo["dropped_attention"] == a8["dropped_attention"] and not jo["dropped_mlp"]
        it_text = "chose the same 8 attention layers as" if same_it else "changed the choice of"
        jo_text = "picked only attention modules, i.e. the same plan" if same_jo else "mixed attention and MLP modules"
        out.append(f"- Iterative re-scoring {it_text} one-shot; joint ranking {jo_text}.")
    for n in (4, 8):
        a, b = by.get(f"drop-block-{n}"), by.get(f"consecutive-block-{n}")
        if a and b:
            out.append(f"- {n} blocks: our scores (blocks {a['dropped_blocks']}) give perplexity "
                       f"{a['perplexity']:.1f} vs {b['perplexity']:.1f} for the consecutive span "
                       f"{b['dropped_blocks']}, and mean accuracy {a['mean_accuracy']:.3f} vs "
                       f"{b['mean_accuracy']:.3f}.")
    ms = [r for n, r in by.items() if n.startswith("mindskip")]
    if ms and a8:
        fewer = all(15 * (1 - r.get("attn_executed", 1)) < 8 and r["mean_accuracy"] < a8["mean_accuracy"] for r in ms)
        lead = ("MindSkip routers skipped fewer attention computations than the 8-layer drop yet lost more accuracy"
                if fewer else "MindSkip routers vs the 8-layer drop")
        out.append(f"- {lead}: " + "; ".join(f"{r['name']} executes {r.get('attn_executed', float('nan')):.2f} of "
                                            f"the 15 routed attentions (about "
                                            f"{15 * (1 - r.get('attn_executed', 1)):.1f} skipped), accuracy "
                                            f"{r['mean_accuracy']:.3f}, perplexity {r['perplexity']:.1f}"
                                            for r in ms)
                   + f" (drop-attn-8: {a8['mean_accuracy']:.3f}, {a8['perplexity']:.1f}). The routers may only use "
                   "layers 14..28 (the paper's placement), while the most redundant attention layers by LLM-Drop's "
                   f"scores include early ones ({a8['dropped_attention']}); the routers were trained without the "
                   "task LoRAs and on chat text, and their training LM loss rose from "
                   + ", ".join(f"{r.get('router_lm_loss_first_batch', float('nan')):.2f} to "
                               f"{r.get('router_lm_loss_last_10pct', float('nan')):.2f}" for r in ms)
                   + " (first batch vs last tenth of training). A 135M model has far less redundant depth than the "
                   "8B model of the paper.")
    return out


def router_facts(p, s: dict) -> dict:
    return {"capacity_target": s["capacity"], "routed_layers": p.spec["layers"],
            "router_train_samples": p.spec.get("samples"), "train_capacity": p.metrics.get("final_capacity"),
            "router_lm_loss_first_batch": p.metrics.get("first_lm_loss"),
            "router_lm_loss_last_10pct": p.metrics.get("final_lm_loss")}


def respeed(row: dict, s: dict, model, base, pre_ids, dec_ids, o: dict, tag: str, cache) -> dict:
    """Re-measure only the speed columns of a cached row (same plan / routers), keeping its quality numbers."""
    from patchlm.depth.drop import DropKind
    from patchlm.depth.skip import RouterKind

    if s["kind"] == "none":
        on = off = lambda: None
    elif s["kind"] == "drop":
        spec = {"attention": row["dropped_attention"], "mlp": row["dropped_mlp"], "block": row["dropped_blocks"]}
        def on():
            return DropKind().attach(model, dict(spec))
        def off():
            return DropKind().detach(model)
    else:
        p = router_patch(base, s["capacity"], o, tag)
        def on():
            return RouterKind().attach(model, dict(p.spec), p.tensors)
        def off():
            return RouterKind().detach(model)
    t0 = time.perf_counter()
    sp = speeds(model, on, off, pre_ids, dec_ids, o["repeats"])
    row = {**row, **speed_columns(sp), "speed_repeats": o["repeats"]}
    if s["kind"] == "router":
        row.update(router_facts(p, s))
    print(f"  {row['name']} (speed re-measured, {time.perf_counter() - t0:.0f}s): "
          f"prefill x{row['prefill_tokens_per_s_ratio']:.2f} decode x{row['decode_tokens_per_s_ratio']:.2f} "
          f"b8 x{row['decode_b8_tokens_per_s_ratio']:.2f}", flush=True)
    return cache.put(row["name"], row)


def write_page(rows: list[dict], o: dict, tag: str) -> None:
    full = next(r for r in rows if r["name"] == "full")
    for r in rows:
        r["accuracy_retained"] = r["mean_accuracy"] / full["mean_accuracy"] if full["mean_accuracy"] else None
        r["accuracy_drop_points"] = 100 * (full["mean_accuracy"] - r["mean_accuracy"])
        r["perplexity_ratio"] = r["perplexity"] / full["perplexity"]
    cols = ["name", "mean_accuracy", "acc_rotten_tomatoes", "acc_trec", "acc_bbc_news", "perplexity",
            "prefill_tokens_per_s", "prefill_tokens_per_s_ratio", "decode_tokens_per_s", "decode_tokens_per_s_ratio",
            "decode_b8_tokens_per_s", "decode_b8_tokens_per_s_ratio", "kv_cache_bytes", "kv_cache_bytes_ratio"]
    fmt = {"kv_cache_bytes": lambda v: f"{v / 2**20:.2f} MiB",
           "prefill_tokens_per_s": lambda v: f"{v:.0f}", "decode_tokens_per_s": lambda v: f"{v:.1f}",
           "decode_b8_tokens_per_s": lambda v: f"{v:.1f}"}
    for c in cols:
        if c.endswith("_ratio"):
            fmt[c] = lambda v: f"{v:.2f}x"
        elif c.startswith("acc_") or c == "mean_accuracy":
            fmt[c] = lambda v: f"{v:.3f}"
    by = {r["name"]: r for r in rows}
    goals = []
    d8 = by.get("drop-attn-8")
    if d8:
        ok = (d8["accuracy_retained"] >= 0.98 and d8["decode_tokens_per_s_ratio"] >= 1.15
              and abs(d8["kv_cache_bytes_ratio"] - 22 / 30) < 0.01)
        goals.append(f"- **Drop 8/30 attention layers: {'met' if ok else 'NOT met'}.** Mean accuracy retained "
                     f"{100 * d8['accuracy_retained']:.1f}% (goal >= 98%), decode speedup "
                     f"{d8['decode_tokens_per_s_ratio']:.2f}x at batch 1 and "
                     f"{d8['decode_b8_tokens_per_s_ratio']:.2f}x at "
                     f"batch 8 (goal >= 1.15x; best-of-{o['repeats']}: {_best(d8, 'decode_tokens_per_s')} and "
                     f"{_best(d8, 'decode_b8_tokens_per_s')}), KV cache {d8['kv_cache_bytes_ratio']:.3f} of full "
                     f"(goal 22/30 = 0.733).")
    ms = [r for r in rows if r["name"].startswith("mindskip")]
    if ms:
        good = [r for r in ms if r["accuracy_drop_points"] <= 1.0 and r["prefill_tokens_per_s_ratio"] >= 1.15]
        best = max(ms, key=lambda r: r["prefill_tokens_per_s_ratio"])
        goals.append(f"- **MindSkip >= 1.15x prefill at <= 1 point accuracy loss: {'met' if good else 'NOT met'}.** "
                     + "; ".join(f"{r['name']}: prefill {r['prefill_tokens_per_s_ratio']:.2f}x, accuracy "
                                 f"{-r['accuracy_drop_points']:+.1f} points, attention executed "
                                 f"{_fmt_exec(r)}" for r in ms)
                     + f" (fastest: {best['name']}).")
    for n in o["blocks"]:
        a, b = by.get(f"drop-block-{n}"), by.get(f"consecutive-block-{n}")
        if a and b:
            win_acc = a["mean_accuracy"] > b["mean_accuracy"]
            win_ppl = a["perplexity"] < b["perplexity"]
            goals.append(f"- **Our block drop vs consecutive baseline, {n} blocks: "
                         f"{'met' if win_acc and win_ppl else ('partly met' if win_acc or win_ppl else 'NOT met')}.** "
                         f"mean accuracy {a['mean_accuracy']:.3f} vs {b['mean_accuracy']:.3f}, perplexity "
                         f"{a['perplexity']:.2f} vs {b['perplexity']:.2f} (ours drops {a.get('dropped_blocks')}, "
                         f"baseline {b.get('dropped_blocks')}).")
    plans = md_table([r for r in rows if "method" in r or "routed_layers" in r],
                     ["name", "method", "dropped_attention", "dropped_mlp", "dropped_blocks", "capacity_target",
                      "train_capacity", "attn_executed"],
                     {"train_capacity": lambda v: f"{v:.2f}", "attn_executed": lambda v: f"{v:.2f}"})
    best = md_table(rows, ["name", "best_prefill_tokens_per_s_ratio", "best_decode_tokens_per_s_ratio",
                           "best_decode_b8_tokens_per_s_ratio", "prefill_tokens_per_s_ratio",
                           "decode_tokens_per_s_ratio", "decode_b8_tokens_per_s_ratio"],
                    {c: (lambda v: f"{v:.2f}x") for c in [
                        "best_prefill_tokens_per_s_ratio", "best_decode_tokens_per_s_ratio",
                        "best_decode_b8_tokens_per_s_ratio", "prefill_tokens_per_s_ratio",
                        "decode_tokens_per_s_ratio", "decode_b8_tokens_per_s_ratio"]})
    md = f"""
Layer dropping (LLM-Drop) and dynamic depth (MindSkip routers) on `{MODEL}` (30 layers). Each row applies one depth
patch to the same in-memory base; ratios are to `full` measured interleaved in the same run (see `full_speed_same_run`
in the JSON). bf16 autocast everywhere. \
Scale{' (QUICK smoke run: numbers are not meaningful)' if tag == 'quick' else ''}:
accuracy on the first {o['limit']} test examples of rotten_tomatoes and trec and {o['bbc_limit']} of bbc_news (max 256
tokens), each with a LoRA patch (r=8, all linear layers, {o['lora_steps']} steps) trained on the full model and cached;
perplexity on {o['ppl_blocks']} x 256 held-out news_corpus tokens; drop plans scored on {o['calib_samples']} x
{o['calib_len']} {DropConfig.calib} train tokens (the paper uses 256 x 2048 C4 tokens); routers trained on
{o['router_samples']} sharegpt conversations cut to {o['router_len']} tokens (those with an assistant reply inside
the cut: `router_train_samples` in the JSON; {SkipConfig.epochs} epoch, batch {SkipConfig.batch_size},
lr {SkipConfig.lr}, capacity term 2.0 x relu(mean(m) - target)), routing the last 15 layers but the final one
(14..28). Speed: prefill of 8 x 128 tokens; greedy decoding of 32 tokens after a 32-token prompt at batch 1 and 8;
KV-cache bytes after decoding at batch 8.
`python bench/depth.py --respeed` re-measures only the speed columns of the cached rows (it was run once after the
first pass, raising the repeats from 3 to {o['repeats']} because the full-vs-full ratio showed up to 9% noise).

## Goals
{chr(10).join(goals)}

## Results
{md_table(rows, cols, fmt)}

## Speed, best of {o['repeats']}
The table above uses medians of {o['repeats']} interleaved repeats. The fastest repeat estimates the uncontended
speed on this shared machine; the `full` row compares the full model with itself and shows the noise level.

{best}

## Plans
{plans}

## What the numbers show
{chr(10).join(findings(by))}

## Notes
- A dropped attention layer is removed from the module tree, computes nothing, and its KV-cache layer is never
  allocated (the remaining attention layers are renumbered 0..K-1), so the KV cache shrinks exactly by the dropped
  fraction. A dropped MLP or block removes its compute but not KV cache (except for the attention half of a block).
- MindSkip (sequence level) splits the batch: only sequences whose router score is >= 0.5 run a routed attention,
  and only they get a cache entry for it; the prefill decision is reused for every decoded token. Its KV-cache bytes
  therefore depend on the prompts.
- Decode at batch 1 on a CPU is dominated by per-module overhead and the 49152 x 576 output head, so removing a
  sub-layer saves less than its share of FLOPs; prefill is dominated by the matrix products.
- Timings come from a shared 2-core machine; the interleaved `full` measurement in each row is the reference.
  Absolute tokens/s of different rows were measured at different times (other jobs share the cores), so compare
  the ratios; each row's own full-model numbers are in `full_speed_same_run` in the JSON.
"""
    write_results("depth", rows, md, extra={"scale": {k: v for k, v in o.items()}},
                  suffix="" if tag == "full" else "-quick")


def _best(r: dict, key: str) -> str:
    v = r.get(f"best_{key}_ratio")
    return f"{v:.2f}x" if isinstance(v, float) else "-"


def _fmt_exec(r):
    v = r.get("attn_executed")
    return f"{v:.2f}" if isinstance(v, float) else "-"


if __name__ == "__main__":
    main()
