"""Routing benchmark: a library of smollm2-135m LoRA experts (one per built-in classification task), routed
by GLIDER (global + local, global only, local only), Phatgoose, Arrow (PEFT), and the baselines (base, merged
library, uniform averaging, best single expert, oracle) on a mixed stream of test inputs unlabeled by task.

    PATCHLM_BENCH_LOCK=/tmp/patchlm-cpu.lock python bench/route.py            # full study (rows cached)
    python bench/route.py --quick                                            # smoke run on tiny-random-llama

Held-in (in the library): rotten_tomatoes, tweet_sentiment, trec, bbc_news. Held-out: movie_sentiment (a
related task, rotten_tomatoes' movie reviews, is in the library) and sms_spam (nothing related is).
Experts: bench/zoo.py's shared 150-step LoRA specialists (the merging study's recipe; trained once into
bench/.cache/zoo/ when missing, resumable, and reused by bench/moe.py, bench/mcsmoe.py, bench/merging.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo
from common import CACHE, RowCache, bench_lock, md_table, write_results

MODEL = "smollm2-135m"
HELD_IN = ["rotten_tomatoes", "tweet_sentiment", "trec", "bbc_news"]
HELD_OUT = ["movie_sentiment", "sms_spam"]
DESCRIPTIONS = {
    "rotten_tomatoes": "movie review sentiment: is a critic's snippet negative or positive",
    "tweet_sentiment": "tweet sentiment: is a tweet negative, neutral or positive",
    "trec": "question classification: what type of answer does a question ask for",
    "bbc_news": "news topic classification: business, entertainment, politics, sport or tech",
    "movie_sentiment": "movie review sentiment: is a review snippet negative or positive",
    "sms_spam": "spam detection: is a text message normal or spam",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_experts(steps: int) -> dict[str, Path]:
    """task -> expert patch dir for every held-in task: the zoo's shared specialists (trained once when missing)."""
    return {t: zoo.specialist(t, steps, MODEL, log=log) for t in HELD_IN}


def build_library(experts: dict[str, Path], tag: str, n_examples: int = 5) -> Path:
    """The study's library directory: each held-in expert with its description, training prompts and task."""
    from patchlm.data import load_task
    from patchlm.route import Library

    d = CACHE / "route" / f"library-{tag}"
    lib = Library.open_or_create(d)
    for t, path in experts.items():
        if t in lib.names:
            continue
        task = load_task(t)
        lib.add(path, description=DESCRIPTIONS[t], examples=[task.prompt(e) for e in task.train[:n_examples]],
                name=t, task=t)
    return d


def quick_experts(tag: str, model: str = "tiny-random-llama", spec: dict | None = None) -> dict[str, Path]:
    """Random-valued LoRA experts: of tiny-random-llama for --quick (a smoke run of the code path, not a result),
    or of the study's model and shape for --speed-only (speed does not depend on the values)."""
    import torch

    from patchlm.adapters.lora import LoraKind
    from patchlm.models import load_base
    from patchlm.patch import Patch

    base = load_base(model)
    out = {}
    for i, t in enumerate(HELD_IN):
        d = CACHE / "route" / (f"quick-expert-{t}" if spec is None else f"random-expert-{model}-{t}")
        if not (d / "patch.json").exists():
            kind = LoraKind()
            spec_i = kind.attach(base.model, spec or {"r": 4, "alpha": 8, "targets": "all-linear"}, None, seed=i)
            g = torch.Generator().manual_seed(i)
            tensors = {k: torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_B") else v
                       for k, v in kind.state(base.model).items()}
            kind.detach(base.model)
            Patch(kind="lora", base=base.ref(), spec=spec_i, tensors=tensors).save(d, force=True)
        out[t] = d
    return out


ROWS = [  # (row name, RouteConfig overrides)
    ("base", {"router": "base"}),
    ("oracle", {"router": "oracle"}),
    ("merged library (ties 0.5)", {"router": "merged"}),
    ("uniform averaging", {"router": "uniform"}),
    ("best single expert", {"router": "best"}),
    ("arrow (PEFT)", {"router": "arrow"}),
    ("phatgoose = glider local only", {"router": "phatgoose"}),
    ("glider global only", {"router": "glider-global"}),
    ("glider (global + local)", {"router": "glider"}),
    ("glider (global from inputs + local)", {"router": "glider", "global_from": "input"}),
    ("glider (global + local; scale 3)", {"router": "glider", "global_scale": 3.0}),  # the paper's FLAN scale
]


def eval_row(name: str, over: dict, lib_dir: Path, model: str, args) -> dict:
    from patchlm.data import load_task
    from patchlm.merge.patch_merge import merge_patches
    from patchlm.models import load_base
    from patchlm.route import Library, RouteConfig
    from patchlm.route.evaluate import evaluate_router

    cfg = RouteConfig(**{"limit": args.limit, "bf16": True, **over})
    lib = Library.open(lib_dir)
    base = load_base(model)
    tasks = {t: load_task(t) for t in HELD_IN + HELD_OUT}
    merged = None
    if cfg.router == "merged":
        merged = merge_patches(lib.patches(), cfg.merge_method, params={"density": cfg.merge_density}, seed=cfg.seed)
    row = evaluate_router(base, lib, tasks, cfg, merged=merged, log=log)
    return {"name": name, **{k: v for k, v in over.items() if k != "router"}, **row}


def gates_row(lib_dir: Path, model: str, args) -> dict:
    from patchlm.data import load_task
    from patchlm.models import load_base
    from patchlm.route import Library, RouteConfig, routed
    from patchlm.route.gates import train_gates

    lib = Library.open(lib_dir)
    base = load_base(model)
    cfg = RouteConfig(gate_steps=args.gate_steps, bf16=True)
    routed.install(base.model, lib.patches())
    t0 = time.perf_counter()
    train_gates(base, lib, {e.name: load_task(e.task) for e in lib.experts}, cfg, force=True, log=log)
    return {"name": "gates", "gate_steps": cfg.gate_steps, "seconds": time.perf_counter() - t0}


def speed_row(lib_dir: Path, model: str, args) -> dict:
    """tokens/s of 8 experts at top-2 (the 4 real ones twice) vs the base with one LoRA merged in, same batches."""
    import torch

    from patchlm.adapters.lora import merge_lora
    from patchlm.data import load_task
    from patchlm.data.features import collate, encode_prompt, pad_id
    from patchlm.models import load_base
    from patchlm.patch import get_kind
    from patchlm.route import Library, routed

    lib = Library.open(lib_dir)
    base = load_base(model)
    prompts = []
    for t in HELD_IN + HELD_OUT:
        task = load_task(t)
        prompts += [encode_prompt(base.tokenizer, task, e, 256) for e in task.test[:8]]
    batches = [collate([{"input_ids": p} for p in prompts[i:i + 16]], pad_id(base.tokenizer), labels=False)
               for i in range(0, len(prompts), 16)]

    def rate() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            base.model(**batches[0])  # warm-up
            t0, n = time.perf_counter(), 0
            for b in batches:
                base.model(**b)
                n += int(b["attention_mask"].sum())
        return n / (time.perf_counter() - t0)

    base.model.eval()
    patches = lib.patches()
    p0 = patches[0]
    p0.apply(base)
    merge_lora(base.model)
    merged_rate = rate()
    get_kind("lora").detach(base.model)
    out = {"name": "speed", "merged_one_lora_tokens_per_s": merged_rate}
    for level in ("token", "sequence"):
        for dispatch in ("split", "auto"):
            routed.install(base.model, (patches * 2)[:8], top_k=2, level=level, dispatch=dispatch)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for m in routed.routed_modules(base.model).values():
                    for v in m.gates:
                        v.copy_(torch.nn.functional.layer_norm(torch.randn(v.shape, generator=g), v.shape))
            mods = routed.routed_modules(base.model).values()
            tag = "" if dispatch == "auto" else "_split"
            if dispatch == "auto":
                out["dense_modules"] = sum(m.dense_ok for m in mods)
                out["routed_modules"] = len(mods)
            out[f"routed8_top2_{level}{tag}_tokens_per_s"] = rate()
            out[f"ratio_{level}{tag}"] = out[f"routed8_top2_{level}{tag}_tokens_per_s"] / merged_rate
            routed.remove(base.model)
    return out


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_page(rows: list[dict], speed: dict | None, gates: dict | None, args, missing: list[str]) -> None:
    by = {r["name"]: r for r in rows}
    acc_cols = [f"acc_{t}" for t in HELD_IN + HELD_OUT]
    cols = ["name", *acc_cols, "held_in_mean", "held_out_mean", "routing_accuracy", "tokens_per_s", "peak_rss_mib"]
    table = md_table(rows, cols, {c: fmt for c in cols if c != "name"})
    oracle = by.get("oracle", {}).get("held_in_mean")
    others = [by[n]["held_in_mean"] for n in by if n.startswith(("merged", "arrow", "phatgoose"))]
    outs = [by[n]["held_out_mean"] for n in by if n.startswith(("arrow", "phatgoose"))]

    def goal(ok) -> str:
        return "not measured" if ok is None else ("yes" if ok else "no")

    def judged(name: str) -> list[str]:
        """One GLIDER row's verdict on the three accuracy goals: 'yes/no (numbers)' per goal."""
        g = by.get(name, {})
        gi, go, ra = g.get("held_in_mean"), g.get("held_out_mean"), g.get("routing_accuracy")
        g1 = None if gi is None or oracle is None or not others else (gi >= oracle - 0.02 and gi > max(others))
        g2 = None if go is None or not outs else go >= max(outs)
        g3 = None if ra is None else ra >= 0.95
        return [f"{goal(g1)} ({fmt(gi)}; oracle {fmt(oracle)}, best other {fmt(max(others) if others else None)})",
                f"{goal(g2)} ({fmt(go)}; best {fmt(max(outs) if outs else None)})", f"{goal(g3)} ({fmt(ra)})"]

    variants = [(n, head) for n, head in (
        ("glider (global + local)", "GLIDER as the paper (the base model writes the instructions), scale 100"),
        ("glider (global + local; scale 3)", "the same at scale 3 (the paper's FLAN setting)"),
        ("glider (global from inputs + local)", "GLIDER, global part from the inputs' embeddings (ours)"))
        if n in by or n == "glider (global + local)"]
    verdicts = [judged(n) for n, _ in variants]
    g4 = None if not speed else speed["ratio_token"] >= 0.7
    goals = "\n".join([
        "| goal | " + " | ".join(h for _, h in variants) + " |", "|---" * (len(variants) + 1) + "|",
        *(f"| {text} | " + " | ".join(v[i] for v in verdicts) + " |" for i, text in enumerate((
            "held-in within 2 points of the oracle and above every merge, Arrow, Phatgoose",
            "held-out >= best of Phatgoose and Arrow", "routing accuracy >= 95% (held-in)"))),
        f"| 8 experts top-2 >= 0.7x tokens/s of base + one merged LoRA | {goal(g4)} "
        + (f"(token {speed['ratio_token']:.2f}x, sequence {speed['ratio_sequence']:.2f}x)" if speed else "")
        + " |" + " (the same routed modules) |" * (len(variants) - 1)])
    findings = ""
    gl, gg = by.get("glider (global + local)"), by.get("glider global only")
    gp, g3 = by.get("phatgoose = glider local only"), by.get("glider (global + local; scale 3)")
    if gl and gg and gp:
        weakest = min(HELD_IN, key=lambda t: gg[f"acc_{t}"])
        small = (f"At scale 3 (the paper's FLAN setting) the same instructions weigh less: held-in "
                 f"{fmt(g3['held_in_mean'])}, routing {fmt(g3['routing_accuracy'])}, held-out "
                 f"{fmt(g3['held_out_mean'])}." if g3 else "Not measured yet: scale 3 (the paper's FLAN setting).")
        findings = (
            "\n\n## Findings\n\n"
            f"- The paper's GLIDER loses to its own local part here: with smollm2-135m writing the instructions, the "
            f"global part alone routes {fmt(gg['routing_accuracy'])} of held-in inputs right (worst task {weakest}: "
            f"{fmt(gg[f'acc_{weakest}'])} accuracy) and adding it to Phatgoose's gates "
            f"({fmt(gp['routing_accuracy'])} alone) pulls routing down to {fmt(gl['routing_accuracy'])}: the "
            "instructions a 135M model writes do not separate the tasks, and at scale 100 (the paper's held-in T0 "
            f"setting) the global bias outweighs the local gates. {small} Not tried: a larger instruction writer.\n"
            "- Embedding the raw input instead of a generated instruction (the same minilm-l6 and scale 100) keeps "
            "the global part's benefit without the writer (its column above). It is our variant, not the paper's "
            "method, and it uses no generation (so it is also the faster one).")
    status = ("**Partial**: rows still to run: " + ", ".join(missing) + f" (about {4 * len(missing)} minutes on "
              "2 cores; `bench/route.py` resumes from its row cache)." if missing else "All rows measured.")
    sp = ""
    if speed:
        sp = (f"\n\n## Speed\n\nForward passes over 48 mixed prompts in batches of 16, bf16: base with one LoRA merged "
              f"{speed['merged_one_lora_tokens_per_s']:.0f} tokens/s; 8 experts at top-2, token level "
              f"{speed['routed8_top2_token_tokens_per_s']:.0f} ({speed['ratio_token']:.2f}x), sequence level "
              f"{speed['routed8_top2_sequence_tokens_per_s']:.0f} ({speed['ratio_sequence']:.2f}x)"
              + (f"; dispatch auto ({speed['dense_modules']} of {speed['routed_modules']} modules dense). The split "
                 f"dispatch (each expert gathers its own tokens) in the same run: token "
                 f"{speed['ratio_token_split']:.2f}x, sequence {speed['ratio_sequence_split']:.2f}x"
                 if "ratio_token_split" in speed else "") + "."
              + (f" Experts: {speed['experts']}." if speed.get("experts") else ""))
    md = f"""{status}

## Goals

{goals}{findings}

## Setup

Library: one smollm2-135m LoRA per held-in task ({', '.join(HELD_IN)}; r=8, alpha 16, all linear modules, 150
steps, batch 8, lr 5e-4, bf16, 192 tokens (bbc_news 128), best of validation: bench/zoo.py's shared specialists,
the merging study's recipe). Held-out: movie_sentiment (its sibling rotten_tomatoes is in the library, same
prompt template) and sms_spam (nothing related). health_tweets is a text task, not classification, so it is
not in the stream. Stream: the first {args.limit} test examples of each of the six tasks, interleaved, batches of
16 mixed by length; every input is scored by label log-likelihood over its own task's labels, the router sees
only the prompt. The prompts carry each task's template, which names the task's labels: this makes routing
easier than T0/FLAN's. Routers: top-2, token level, renormalised softmax. Phatgoose gates: {gates['gate_steps'] if
gates else '-'} AdamW steps per expert (lr 5e-3, batch 8) with the expert frozen, standardised after
training. GLIDER: the base model (smollm2-135m itself) writes a 24-token instruction per expert (description +
3 examples) and per query; minilm-l6 embeds them; scale 100 x cosine is added to every module's local logits.
"global from inputs" embeds the raw prompt and the mean of the expert's example prompts instead. Merged library:
TIES at density 0.5 (the merging study's best). Best single expert: chosen on a validation stream. Oracle: each
held-in input to its own expert (held-out inputs get no expert, so its held-out mean is the base's).
Routing accuracy: the input's own expert among the top-2 experts by routing mass summed over tokens and modules.
tokens_per_s counts the evaluation forward passes only (GLIDER's instruction writing is in total_seconds).

## Results

{table}{sp}
"""
    # a page rewritten from the rows names the command that measured them
    cmd = "python bench/route.py" if args.page_only or args.speed_only else None
    write_results("route", rows + ([speed] if speed else []), md, cmd=cmd,
                  extra={"partial": bool(missing), "missing_rows": missing})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--gate-steps", type=int, default=30)
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--page-only", action="store_true", help="write the page from cached rows only")
    ap.add_argument("--train-only", action="store_true", help="only train the missing experts")
    ap.add_argument("--speed-only", action="store_true", help="only the speed row, with random-valued experts of "
                    "the study's model and shape (no training; the page is rewritten from the cached rows)")
    args = ap.parse_args()
    tag = "quick" if args.quick else "full"
    cache = RowCache("route", tag, committed=True)  # the gates row is rebuilt where the library lacks them
    if args.speed_only and not args.quick:
        if cache.get("speed") is None:
            lib_dir = build_library(quick_experts(tag, MODEL, dict(zoo.SPEC)), "speed")
            cache.run("speed", lambda: {**speed_row(lib_dir, MODEL, args),
                                        "experts": "random-valued LoRAs of the study's shape (r 8, all-linear)"})
        args.page_only = True
    if args.quick:
        args.limit, args.gate_steps = 4, 2
        experts, model = quick_experts(tag), "tiny-random-llama"
    elif args.page_only:  # nothing computes: no expert is trained, no library built
        experts, model = {}, MODEL
    else:
        experts, model = build_experts(args.steps), MODEL
    if args.train_only:
        return
    lib_dir = build_library(experts, tag) if experts else None
    suffix = f"l{args.limit}-g{args.gate_steps}"
    want = [n for n, _ in ROWS if not args.rows or n in args.rows.split(",")]
    gk = f"gates-g{args.gate_steps}"
    gates = cache.get(gk)
    if not args.page_only and (gates is None or not (lib_dir / "gates").is_dir()):
        with bench_lock():  # trained gates live in this machine's library: train them again where they are missing
            gates = cache.put(gk, gates_row(lib_dir, model, args))
    rows, missing = [], []
    for name, over in ROWS:
        key = f"row-{name}-{suffix}"
        hit = cache.get(key)
        if hit is None and not args.page_only and name in want:
            log(f"row {name}")
            hit = cache.run(key, lambda name=name, over=over: eval_row(name, over, lib_dir, model, args))
        if hit is None:
            missing.append(name)
        else:
            rows.append(hit)
    speed = cache.get("speed")
    if speed is None and not args.page_only:
        speed = cache.run("speed", lambda: speed_row(lib_dir, model, args))
    if speed is None:
        missing.append("speed")
    if not args.quick:
        write_page(rows, speed, gates, args, missing)
    else:
        log(f"quick: {len(rows)} rows, speed {speed}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
