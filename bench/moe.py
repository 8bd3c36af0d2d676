"""MoE benchmark: upcycled Mixtral MoEs (each gate mode, routers untrained and router-trained) and Model-GLUE's
model-, block- and FFN-level mixtures of the merging study's task patches plus a news language-model specialist,
against the base, each specialist, the best merge and an oracle.

    python bench/moe.py            # full study on smollm2-135m (zoo shared with bench/merging.py, cached)
    python bench/moe.py --quick    # smoke run on tiny-random-llama (a few training steps per specialist)

Each finished row is cached under bench/.cache/moe/<tag>/ (an interrupted run resumes). Speeds are tokens/s of
the row's model divided by the base's, both measured inside the same row computation.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo
from common import RowCache, md_table, write_results

NEWS = "news_corpus"
GATES = ("hidden", "cheap_embed", "random", "uniform_random")
LEVELS = ("model", "block", "ffn")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- the zoo
def specialist(t: str, args) -> Path:
    """A specialist's patch dir: the zoo's shared LoRA specialist of the task (the merging study's recipe; news_corpus
    as blocks of 128 tokens), trained once when missing."""
    return zoo.specialist(t, args.steps, args.model, tag="quick" if args.quick else None, log=log)


# ---------------------------------------------------------------- measurements
def accuracy(model, tok, tasks, limit) -> dict[str, float]:
    return zoo.evaluate_tasks(SimpleNamespace(model=model, tokenizer=tok), tasks, limit)


def news_ppl(model, tok, args) -> float:
    from patchlm.data.features import example_text
    from patchlm.evaluate.perplexity import perplexity

    t = zoo.load(NEWS)
    texts = [example_text(t, e) for e in t.test[: args.news_docs]]
    return perplexity(model, tok, texts, block_size=128, batch_size=4, max_tokens=args.news_tokens,
                      bf16=True)["perplexity"]


def _prefill(model, ids):
    import torch

    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def _decode(model, ids, new: int):
    """Greedy decoding of `new` tokens: with the model's KV cache when it has one, else re-running the sequence."""
    import torch

    with torch.no_grad():
        if getattr(model, "generate", None) is not None and not getattr(model, "_no_cache", False):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
            return
        if hasattr(model, "route"):  # model-level mixture: route once, decode with the chosen family's cache
            fams = model.route(ids)
            for f in fams.unique().tolist():
                rows = (fams == f).nonzero().squeeze(-1)
                _decode(model.families[f], ids[rows], new)
            return
        x = ids
        for _ in range(new):
            nxt = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], 1)


def _rates(model, ids, args) -> tuple[float, float]:
    """One prefill rate and one decode rate (tokens/s) of `model` on `ids`."""
    from patchlm.evaluate.probes import Timer

    b = ids.shape[0]
    with Timer() as t:
        _prefill(model, ids)
    # decode: (N - 1) tokens in the time N new tokens take beyond one (the prefill and the first token)
    with Timer() as t1:
        _decode(model, ids, 1)
    with Timer() as t2:
        _decode(model, ids, args.new_tokens)
    # a rep whose one-token decode took as long as the N-token one (a stall on the shared CPU inside t1) says
    # nothing about decoding: NaN, which the best-of-reps skips (1e-6 in the denominator made it 1.5e7 tokens/s)
    gap = t2.seconds - t1.seconds
    return t.rate(b * args.prompt_len), (b * (args.new_tokens - 1) / gap if gap > 0.05 * t2.seconds
                                         else float("nan"))


def with_ratios(row: dict, model, base_model, vocab: int, args) -> dict:
    """Prefill and decode tokens/s at batch 1 and 8 as ratios to the base: the two models alternate rep by rep on
    the same inputs and each keeps its best rep (a shared, busy CPU only ever slows a rep down). Also the
    weights' size and the process's memory above the start while the model runs (activations, KV cache)."""
    import torch

    from patchlm.evaluate.probes import MemoryProbe
    from patchlm.moe.upcycle import ExpertHits

    g = torch.Generator().manual_seed(0)
    extra = 0.0
    for b in (1, 8):
        ids = torch.randint(5, vocab, (b, args.prompt_len), generator=g)
        best = {"m": [0.0, 0.0], "b": [0.0, 0.0]}
        for m in (model, base_model):
            _prefill(m, ids)  # warm-up
        for _ in range(args.reps):
            for who, m in (("m", model), ("b", base_model)):
                if who == "m":
                    with MemoryProbe() as mem:
                        r = _rates(m, ids, args)
                    extra = max(extra, mem.peak_bytes - mem.start_bytes)
                else:
                    r = _rates(m, ids, args)
                best[who] = [x if y != y else max(x, y) for x, y in zip(best[who], r)]  # y != y: NaN
        # the experts each forward reads (an MoE's; None otherwise), counted in one more, untimed pass: the counting
        # hooks stay out of the timed reps. A decoding step runs b tokens, the prefill b x prompt_len.
        with ExpertHits(model) as hits:
            _rates(model, ids, args)
        row[f"prefill_b{b}_touched"] = hits.touched_params(tokens=b * args.prompt_len)
        row[f"decode_b{b}_touched"] = hits.touched_params(tokens=b)
        row[f"prefill_b{b}_x"] = best["m"][0] / best["b"][0]
        row[f"decode_b{b}_x"] = best["m"][1] / best["b"][1] if best["m"][1] > 0 and best["b"][1] > 0 else None
        row[f"base_prefill_b{b}_tok_s"], row[f"base_decode_b{b}_tok_s"] = best["b"]
    row["weights_mb"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                            ) / 2**20
    row["run_mb"] = extra / 2**20
    return row


def dense_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- rows
def run(args) -> list[dict]:
    from patchlm.merge.patch_merge import merge_patches
    from patchlm.models import load_base
    from patchlm.moe import Expert, MoeConfig, upcycle
    from patchlm.moe.mixtures import mix
    from patchlm.moe.train import train_routers
    from patchlm.patch import Patch, get_kind

    cache = RowCache("moe", args.tag, committed=True)  # pure results (the specialists live in the zoo)
    names = [*zoo.TASKS, NEWS]
    members: dict[str, Path] = {}
    tasks = {t: zoo.load(t) for t in zoo.TASKS}
    state: dict = {}
    pending: list[str] = args.pending

    def row(key, fn, needs=()):
        """Compute (or read) a row when --rows selects it; otherwise only read it from the cache. The specialists
        it needs are trained first, each as its own row (its own turn of the lock), only when the row computes."""
        if not args.page and (not args.rows or any(fnmatch.fnmatch(key, pat) for pat in args.rows)):
            if cache.get(key) is None:
                for t in needs:
                    members.setdefault(t, specialist(t, args))
            log(key)
            return cache.run(key, fn)
        hit = cache.get(key)
        if hit is None:
            pending.append(key)
        return hit

    def base():
        if "base" not in state:
            state["base"] = load_base(args.model)
        return state["base"]

    def measure(name, model, extra=None, speed_too=True):
        b = base()
        acc = accuracy(model, b.tokenizer, tasks, args.limit)
        row = {"name": name, **{f"acc_{t}": a for t, a in acc.items()}, "mean_accuracy": mean(acc.values()),
               "news_ppl": news_ppl(model, b.tokenizer, args), **(extra or {})}
        row.setdefault("total_params", dense_params(model))
        row.setdefault("active_params", row["total_params"])
        if speed_too:
            with_ratios(row, model, b.model, b.model.config.vocab_size, args)
        return row

    rows = [row("base", lambda: measure("base", base().model))]

    def base_copies(copies, mode="random"):
        """An fp32 MoE of `copies` identical experts: the base's own checkpoint, the study's top-k."""
        b = base()
        return upcycle(args.model, [Expert(str(b.path)) for _ in range(copies)],
                       MoeConfig(gate_mode=mode, top_k=args.top_k, dtype="float32"), base=b)

    def preservation(copies=4, mode="random"):
        """An MoE of `copies` identical experts (the base's own checkpoint) against the base, fp32 logits."""
        import torch

        b = base()
        up = base_copies(copies, mode)
        ids = torch.randint(5, b.model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = b.model(input_ids=ids).logits
            diff = (up.model(input_ids=ids).logits - ref).abs().max().item()
            # the same check in float64: what is left is the router's float32 softmax (transformers' Mixtral
            # computes it in float32 for any model dtype), not a different function
            up.model.double()
            up.model.set_experts_implementation("eager")  # torch's grouped_mm takes no float64
            b.model.double()
            try:
                diff64 = (up.model(input_ids=ids).logits - b.model(input_ids=ids).logits).abs().max().item()
            finally:
                b.model.float()
        return {"name": "function preservation", "kind": "check", "copies": copies, "gate_mode": mode,
                "max_abs_logit_diff": diff, "max_abs_logit_diff_fp64": diff64, "max_abs_logit": ref.abs().max().item()}

    rows.append(row("function-preservation", preservation))

    def dispatch(copies=4):
        """Routing and dispatch cost alone: an MoE of `copies` copies of the base (random gate, the study's top-k),
        speed only. Its shapes, and so its speed, are those of the specialists' MoE: only the values differ."""
        b = base()
        up = base_copies(copies)
        out = {"name": f"dispatch: MoE of {copies} base copies, top-{args.top_k}", "kind": "dispatch",
               "total_params": up.report["total_params"], "active_params": up.report["active_params"]}
        return with_ratios(out, up.model, b.model, b.model.config.vocab_size, args)

    rows.append(row(f"dispatch-copies-k{args.top_k}", dispatch))
    for t in names:
        def one(t=t):
            p = Patch.load(members[t])
            p.apply(base())
            try:
                return measure(f"specialist {t}", base().model, {"kind": "specialist"}, speed_too=False)
            finally:
                get_kind(p.kind).detach(base().model)

        rows.append(row(f"specialist-{t}", one, needs=[t]))

    def merge_row():
        m = merge_patches([Patch.load(members[t]) for t in zoo.TASKS], "ties",
                          model_params=[{"weight": 1.0, "density": 0.5}] * len(zoo.TASKS))
        m.apply(base())
        try:
            return measure("best merge (ties d=0.5, merging study)", base().model, {"kind": "merge"},
                           speed_too=False)
        finally:
            get_kind(m.kind).detach(base().model)

    rows.append(row("merge-ties", merge_row, needs=zoo.TASKS))

    def moe_row(mode, trained, shared="base"):
        cfg = MoeConfig(gate_mode=mode, top_k=args.top_k, router_steps=args.router_steps, shared=shared,
                        batch_size=args.batch_size, max_length=args.max_length, bf16=True, dtype="float32")
        up = upcycle(args.model, [Expert(str(members[t])) for t in names], cfg, base=base())
        extra = {"kind": "moe", "gate_mode": mode, "router_trained": trained, "shared": shared,
                 "total_params": up.report["total_params"], "active_params": up.report["active_params"]}
        if trained:
            extra["router_training"] = train_routers(up.model, up.tokenizer, up.report["expert_tasks"], cfg)
        name = f"MoE {mode}" + (" + router training" if trained else "") + \
            (f", shared={shared}" if shared != "base" else "")
        # shared=average has the same shapes, so the same speed as its shared=base row
        return measure(name, up.model, extra, speed_too=shared == "base")

    for mode in GATES:
        for trained in (False, True):
            rows.append(row(f"moe-{mode}-{'trained' if trained else 'init'}-k{args.top_k}",
                            lambda mode=mode, trained=trained: moe_row(mode, trained), needs=names))
    # attention, norms and embeddings averaged over the specialists instead of the base's: whether the attention
    # LoRA deltas that shared=base drops explain the gap to the specialists
    rows.append(row(f"moe-hidden-trained-average-k{args.top_k}", lambda: moe_row("hidden", True, "average"),
                    needs=names))

    for level in LEVELS:
        def mix_row(level=level):
            fams = [Patch.load(members[t]) for t in names]
            model, rep = mix(base(), fams, [[t] for t in names], level,
                             config=MoeConfig(top_k=args.top_k, max_length=args.max_length, batch_size=args.batch_size,
                                              bf16=True, dtype="float32"),
                             prefix_layers=args.mix_layers, router_steps=args.router_steps)
            if level == "block":
                model._no_cache = True
            extra = {"kind": "glue-mix", "level": level, "total_params": rep["total_params"],
                     "active_params": rep["active_params"], "router_training": rep.get("router_training")}
            return measure(f"Model-GLUE {level}-level mixture", model, extra)

        rows.append(row(f"glue-{level}-k{args.top_k}", mix_row, needs=names))
    rows = [r for r in rows if r is not None]
    spec = {r["name"].removeprefix("specialist "): r for r in rows if r.get("kind") == "specialist"}
    if all(t in spec for t in [*zoo.TASKS, NEWS]):
        oracle = {"name": "oracle (each task's own specialist)", "kind": "oracle",
                  **{f"acc_{t}": spec[t][f"acc_{t}"] for t in zoo.TASKS},
                  "news_ppl": spec[NEWS]["news_ppl"]}
        oracle["mean_accuracy"] = mean(oracle[f"acc_{t}"] for t in zoo.TASKS)
        rows.append(oracle)
    dense = next((r["total_params"] for r in rows if r["name"] == "base"), None)
    for r in rows:
        ratios = [r.get(f"{k}_x") for k in ("prefill_b1", "prefill_b8", "decode_b1", "decode_b8")]
        if dense and r.get("active_params") and all(x is not None for x in ratios):
            r["dispatch_efficiency"] = min(ratios) / (dense / r["active_params"])
            reads = [r.get(f"decode_b{b}_touched") for b in (1, 8)]
            if all(reads):  # decoding is bound by the weights a step reads: the experts its tokens touch
                r["dispatch_efficiency_read"] = min(
                    *(r[f"prefill_b{b}_x"] / (dense / r["active_params"]) for b in (1, 8)),
                    *(r[f"decode_b{b}_x"] / (dense / t) for b, t in zip((1, 8), reads, strict=True)))
    return rows


def prompts_per_task() -> int:
    from patchlm.moe.config import MoeConfig

    return MoeConfig.prompts_per_task


def read_bound(moe: list[dict]) -> str:
    """The goal's second reading: decoding is bound by the weights a step reads, which are the experts its tokens
    touch (all of them once a batch's tokens spread over the experts), not the active ones."""
    rs = [r for r in moe if r.get("dispatch_efficiency_read") is not None]
    if not rs:
        return ""
    w = min(rs, key=lambda r: r["dispatch_efficiency_read"])
    return (f"; against the weights a step reads (prefill: the active parameters; a decoding step: the experts its "
            f"tokens touch, {w['decode_b1_touched']:,} parameters at batch 1 and {w['decode_b8_touched']:,} of "
            f"{w['total_params']:,} at batch 8, measured), worst {w['name']}: {w['dispatch_efficiency_read']:.2f}")


def page(rows: list[dict], args) -> str:
    cols = ["name", *[f"acc_{t}" for t in zoo.TASKS], "mean_accuracy", "news_ppl", "total_params", "active_params",
            "prefill_b1_x", "prefill_b8_x", "decode_b1_x", "decode_b8_x", "dispatch_efficiency", "decode_b8_touched",
            "dispatch_efficiency_read", "weights_mb", "run_mb"]
    by = {r["name"]: r for r in rows}
    spec = [r for r in rows if r.get("kind") == "specialist"]
    best_single = max(spec, key=lambda r: r["mean_accuracy"]) if spec else None
    merge = next((r for r in rows if r.get("kind") == "merge"), None)
    mixes = [r for r in rows if r.get("kind") in ("moe", "glue-mix")]
    best_mix = max(mixes, key=lambda r: r["mean_accuracy"]) if mixes else None
    oracle = next((r for r in rows if r.get("kind") == "oracle"), None)
    moe = [r for r in rows if r.get("kind") in ("moe", "dispatch") and r.get("dispatch_efficiency") is not None]
    worst = min(moe, key=lambda r: r["dispatch_efficiency"]) if moe else None
    part = " (partial: rows pending)" if args.pending else ""
    if best_mix and best_single and merge:
        beat = best_mix["mean_accuracy"] > max(best_single["mean_accuracy"], merge["mean_accuracy"])
        g2 = ("yes" if beat else "no") + part
        n2 = (f"best mixture so far {best_mix['name']} {best_mix['mean_accuracy']:.3f}; best single "
              f"{best_single['name']} {best_single['mean_accuracy']:.3f}; best merge {merge['mean_accuracy']:.3f}"
              + (f"; oracle {oracle['mean_accuracy']:.3f}" if oracle else "")
              + (f"; base {by['base']['mean_accuracy']:.3f}" if "base" in by else ""))
    else:
        g2, n2 = "not measured", "rows pending"
    fp = by.get("function preservation")
    goals = [
        ("function preservation: an MoE of N identical copies of the base gives the base's logits to 1e-5",
         "not measured here" if fp is None else ("yes" if fp["max_abs_logit_diff"] <= 1e-5 else "no"),
         "checked in tests/test_moe.py (tiny-random-llama, every gate mode; exported checkpoint in plain "
         "transformers)" + ("" if fp is None else
                            f"; here on {args.model}, {fp['copies']} copies, gate {fp['gate_mode']}: max |logit "
                            f"difference| {fp['max_abs_logit_diff']:.2e} (fp32)"
                            + (f", {fp['max_abs_logit_diff_fp64']:.2e} with the whole model in float64 (logits "
                               f"up to {fp['max_abs_logit']:.1f}; transformers' Mixtral router takes its softmax in "
                               "float32 even then, so the top-k weights of identical experts sum to 1 only to "
                               "~1e-7 per layer)" if "max_abs_logit_diff_fp64" in fp else ""))),
        ("best mixture beats the best single specialist and the best merge (mean accuracy)", g2, n2),
        ("mergekit-moe parity (same YAML, same tensors)", "tested, not benchmarked",
         "tests/test_moe.py runs mergekit-moe 0.1.5 in its own venv (`make mergekit-venv`) on every gate mode's "
         "YAML; it skips where that venv is absent, as in CI"),
        ("routing and dispatch cost <= 10% (every speed ratio >= 0.9x of dense/active)",
         "not measured" if worst is None else ("yes" if worst["dispatch_efficiency"] >= 0.9 else "no") + part,
         "-" if worst is None else f"worst MoE row {worst['name']}: {worst['dispatch_efficiency']:.2f}"
         + read_bound(moe)),
    ]
    gtab = "| goal | met? | numbers |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in goals)
    note = ("**Quick smoke run on tiny-random-llama (random weights, specialists trained a few steps): the numbers "
            "say the pipeline runs, not how the methods compare. The full study is `python bench/moe.py`.**\n"
            if args.quick else "")
    if args.pending:
        note += (f"\n**Partial**: {len(args.pending)} rows are not measured yet: {', '.join(args.pending)}. "
                 f"{args.estimate} Rows are cached: `python bench/moe.py` (or `--rows PATTERN`) continues.\n")
    return f"""
{note}
## Goals

{gtab}

## Rows

Model {args.model}; specialists: LoRA patches (r 8, alpha 16, all linear layers, batch 8, lr 5e-4, bf16) of
rotten_tomatoes, trec and bbc_news and a news_corpus LM patch, {args.steps} steps each: bench/zoo.py's shared
specialists (the merging study's recipe: 192 tokens, bbc_news and news_corpus 128, best of validation). Best merge:
TIES (density 0.5, weight 1) of the three task patches, the merging study's best plain merge.
Accuracy on the first {args.limit} test examples of each task;
news perplexity on {args.news_tokens} tokens of news_corpus test articles. MoE rows: 4 experts (one per
specialist, MLPs materialized from the patches), attention/norms/embeddings from the base, top-{args.top_k}
routing; routers from each gate mode (prompts: {prompts_per_task()} training prompts per specialist's task); "+ router
training": {args.router_steps} router-only AdamW steps on the four tasks' mixed training data. Model-GLUE
mixtures: every specialist is its own family (at our scale all patches are > 0.999 similar, so the paper's 0.95
threshold would give one family and nothing to mix); model-level router on the pooled output of the merged
model's first {args.mix_layers} layers; block-level one router per block; FFN-level = the `hidden` MoE of the
families. Routers of the mixtures are as initialised unless their rows say router training. Speed columns:
tokens/s divided by the base's in the same row computation (prompt {args.prompt_len} tokens, {args.new_tokens} new
tokens, batch 1 and 8); the block-level mixture has no KV cache (each decode step re-runs the sequence), the
model-level one routes once and decodes with the chosen family's cache. dispatch_efficiency = the smallest speed
ratio / (dense params / active params): 1.0 means routing and expert dispatch cost nothing beyond the active
parameters. dispatch_efficiency_read divides a decoding column instead by dense params / the parameters its
steps read (decode_b8_touched: every expert that at least one of the step's tokens was routed to, counted by
patchlm.moe.upcycle.ExpertHits; at batch 8 with top-{args.top_k} of 4 experts most steps touch every expert, so
the step reads about the whole MoE and no dispatch code could run it at the active parameters' cost). The two
models alternate rep by rep ({args.reps} reps) and each keeps its best (the CPU is shared
with other jobs). weights_mb: the model's parameters (fp32); run_mb: the process's memory above its start while
the model runs (activations, KV cache).

{md_table([r for r in rows if r.get("kind") != "check"], cols)}
"""



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--router-steps", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--mix-layers", type=int, default=4)
    ap.add_argument("--rows", default="", help="comma-separated fnmatch patterns of row keys to compute "
                    "(e.g. 'base,specialist-*,moe-*-init-*'); the others are read from the cache or left pending")
    ap.add_argument("--page", action="store_true", help="only rewrite the page from the cached rows")
    a = ap.parse_args()
    a.rows = [x for x in a.rows.split(",") if x]
    a.pending = []
    a.estimate = ("Estimate on this 2-core CPU: ~5 min per untrained row, ~10 min per router-trained row (100 "
                  "router steps), ~5-10 min per Model-GLUE row.")
    a.model = "tiny-random-llama" if a.quick else zoo.MODEL
    if a.quick:
        a.steps, a.limit, a.router_steps = 4, 16, 2
    a.tag = "quick" if a.quick else f"s{a.steps}"
    a.batch_size, a.max_length = 8, 128
    a.news_docs, a.news_tokens = 40, 2048 if a.quick else 16384
    a.prompt_len, a.new_tokens, a.reps = (32, 8, 3) if a.quick else (128, 16, 3)
    if a.quick:
        a.mix_layers = 2
    rows = run(a)
    write_results("moe", rows, page(rows, a), extra={"quick": a.quick, "partial": bool(a.pending),
                                                     "pending": a.pending}, suffix="-quick" if a.quick else "")
    log("wrote docs/benchmarks/moe" + ("-quick" if a.quick else "") + ".md")


if __name__ == "__main__":
    main()
