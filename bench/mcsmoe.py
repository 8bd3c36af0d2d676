"""MC-SMoE study: merge the experts of an upcycled MoE by routing statistics, then compress them (low rank + sparse).

    python bench/mcsmoe.py                    # the rows on smollm2-135m (cached one by one: it resumes)
    python bench/mcsmoe.py --rows full-moe,m-smoe-g2    # chosen rows only
    python bench/mcsmoe.py --quick            # smoke run on tiny-random-llama (numbers mean nothing)

The MoE: four experts, three smollm2-135m LoRA specialists (rotten_tomatoes, trec, bbc_news:
bench/zoo.py's shared specialists, 150 steps) and the base model itself as a generalist expert, upcycled into a
top-2 Mixtral (gate mode hidden, then router-only training), built once and cached. Every row loads it, runs
`patchlm.moe.mcsmoe.compress` with the row's CompressConfig (routing statistics on the tasks' first training
examples), writes the checkpoint to measure
its bytes, and evaluates accuracy on the first test examples of each task, perplexity on news_corpus test text,
FLOPs per token (counted from the shapes: weight matmuls) and prefill / decode tokens per second.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo
from common import CACHE, RowCache, md_table, write_results

TASKS = ["rotten_tomatoes", "trec", "bbc_news"]  # one specialist each; the base is the fourth expert
# name -> CompressConfig overrides (in the order they run: the most informative first)
ROWS: dict[str, dict] = {
    "full-moe": {},
    "m-smoe-g2": {"groups": 2},
    "uniform-g2": {"groups": 2, "merge_weights": "uniform"},
    "noalign-g2": {"groups": 2, "align": False},
    "prune-g2": {"groups": 2, "method": "prune"},
    "mc-smoe-g2": {"groups": 2, "low_rank": 128, "sparsity": 0.8},
    "mc-smoe-g2-recover": {"groups": 2, "low_rank": 128, "sparsity": 0.8, "recover": 100},
    "m-smoe-g3": {"groups": 3},
    "m-smoe-g1": {"groups": 1},
    "m-smoe-g2-weighted-router": {"groups": 2, "router_rows": "weighted"},
    "m-smoe-g2-adaptive": {"groups": 2, "layer_groups": "adaptive"},
    "compress-only": {"low_rank": 128, "sparsity": 0.8},
    "m-smoe-g2-recover": {"groups": 2, "recover": 100},
    "noalign-g1": {"groups": 1, "align": False},
    "uniform-g1": {"groups": 1, "merge_weights": "uniform"},
    "prune-g1": {"groups": 1, "method": "prune"},
    # the MoE with every expert's neurons shuffled first (the same function): upcycled experts share the base's
    # neuron order, so alignment has nothing to undo on them; here it has (experts trained from different inits)
    "m-smoe-g2-permuted": {"groups": 2},
    "noalign-g2-permuted": {"groups": 2, "align": False},
}
PERMUTED = {"m-smoe-g2-permuted", "noalign-g2-permuted"}


def shuffle_experts(model, seed: int = 0) -> None:
    """Reorder every expert's neurons by a random permutation (gate and up rows, down columns together): each
    expert, and so the MoE, computes the same function; only the neuron order differs between experts."""
    import torch

    from patchlm.moe.mcsmoe import expert_weights, moe_layers, permute_expert

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in moe_layers(model):
            for e in range(b.experts.gate_up_proj.shape[0]):
                gu, d = expert_weights(b, e)
                gu, d = permute_expert(gu, d, torch.randperm(d.shape[1], generator=g))
                b.experts.gate_up_proj[e] = gu
                b.experts.down_proj[e] = d


def log(msg: str) -> None:
    print(f"[mcsmoe] {msg}", file=sys.stderr, flush=True)


def scale(quick: bool) -> dict:
    if quick:
        return {"model": "tiny-random-llama", "steps": 4, "router_steps": 2, "limit": 8, "calib": 4, "recover": 2,
                "low_rank": 8, "ppl_docs": 2, "speed_tokens": 32, "decode": 4, "tag": "quick"}
    return {"model": "smollm2-135m", "steps": 150, "router_steps": 30, "limit": 100, "calib": 32, "recover": None,
            "low_rank": None, "ppl_docs": 20, "speed_tokens": 256, "decode": 16, "tag": "full"}


# ---------------------------------------------------------------- the MoE
def build_moe(sc: dict, cache: RowCache) -> Path:
    """The zoo's upcycled 4-expert top-2 MoE (3 specialists + the base; gate mode hidden, router-only training),
    built once; its build is recorded as the "moe" row."""
    out, info = zoo.upcycled_moe(sc["steps"], sc["router_steps"], sc["model"],
                                 tag="quick" if sc["tag"] == "quick" else None, log=log)
    old = cache.get("moe")
    if old is None:
        cache.put("moe", info)
    elif old.get("router_training") != info.get("router_training"):
        log("warning: the MoE built now trained its routers differently from the one the cached rows used "
            f"({old.get('router_training')} vs {info.get('router_training')})")
    return out


# ---------------------------------------------------------------- measurements
def perplexity(model, tok, docs: int) -> float:
    from patchlm.data.features import example_text
    from patchlm.evaluate.perplexity import perplexity as ppl

    t = zoo.load("news_corpus")
    texts = [example_text(t, e) for e in t.test[:docs]]
    return ppl(model, tok, texts, block_size=128, batch_size=4, bf16=True)["perplexity"]


def speed(model, sc: dict) -> dict:
    """Prefill tokens/s (4 x speed_tokens/4 tokens, no cache) and greedy decode tokens/s (batch 1, KV cache)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (4, sc["speed_tokens"] // 4), generator=g)
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=False)
        t0 = time.perf_counter()
        for _ in range(2):
            model(input_ids=ids, use_cache=False)
        prefill = 2 * ids.numel() / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.generate(input_ids=ids[:1, :16], attention_mask=torch.ones_like(ids[:1, :16]),
                       max_new_tokens=sc["decode"], min_new_tokens=sc["decode"], do_sample=False, pad_token_id=0)
        decode = sc["decode"] / (time.perf_counter() - t0)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}


def row_config(name: str, sc: dict):
    from patchlm.moe.config import CompressConfig

    over = dict(ROWS[name])
    if sc["low_rank"] is not None and "low_rank" in over:
        over["low_rank"] = sc["low_rank"]
    if sc["recover"] is not None and "recover" in over:
        over["recover"] = sc["recover"]
    return CompressConfig(calib_examples=sc["calib"], batch_size=8, max_length=128, **over)


def measure(name: str, sc: dict, moe_dir: Path) -> dict:
    from patchlm.moe.losparse import factored_params
    from patchlm.moe.mcsmoe import compress, flops_per_token, load_moe, save_compressed

    cfg = row_config(name, sc)
    model, tok = load_moe(moe_dir)
    if name in PERMUTED:
        shuffle_experts(model)
    t0 = time.perf_counter()
    r = compress(model, tok, TASKS, cfg, log=log)
    seconds = time.perf_counter() - t0
    del model
    tmp = Path(tempfile.mkdtemp(prefix="mcsmoe-", dir=CACHE / "mcsmoe"))
    try:
        save_compressed(r, tok, tmp / "ck")
        nbytes = (tmp / "ck" / "model.safetensors").stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = r.model
    c = m.config
    macs = None
    if cfg.compresses:
        h, f = c.hidden_size, c.intermediate_size
        macs = 2 * factored_params(f, h, cfg.low_rank, cfg.sparsity) + factored_params(h, f, cfg.low_rank,
                                                                                       cfg.sparsity)
    log(f"{name}: evaluating")
    acc = zoo.evaluate_tasks(SimpleNamespace(model=m, tokenizer=tok), {t: zoo.load(t) for t in TASKS}, sc["limit"])
    rep = r.report
    return {"name": name, **{f"acc_{t}": a for t, a in acc.items()}, "mean_accuracy": statistics.mean(acc.values()),
            "perplexity": perplexity(m, tok, sc["ppl_docs"]), "experts": rep["experts_after"],
            "expert_params": rep["expert_params"], "expert_params_dense": rep["expert_params_merged"],
            "expert_memory_reduction": rep["expert_memory_reduction"], "checkpoint_bytes": nbytes,
            "flops_per_token": flops_per_token(c, macs), **speed(m, sc), "compress_seconds": seconds,
            "group_counts": (rep.get("plan") or {}).get("counts"), "recovery": rep.get("recovery"),
            "alignment": rep.get("alignment"), "config": {k: v for k, v in ROWS[name].items()},
            "test_examples": sc["limit"]}


# ---------------------------------------------------------------- the page
def page(rows: list[dict], missing: list[str], sc: dict, moe_info: dict | None) -> str:
    full = next((r for r in rows if r["name"] == "full-moe"), None)
    for r in rows:
        if full:
            r["accuracy_delta"] = r["mean_accuracy"] - full["mean_accuracy"]
            r["flops_ratio"] = r["flops_per_token"] / full["flops_per_token"]
            r["bytes_ratio"] = r["checkpoint_bytes"] / full["checkpoint_bytes"]
    cols = ["name", "experts", *[f"acc_{t}" for t in TASKS], "mean_accuracy", "accuracy_delta", "perplexity",
            "expert_params", "expert_memory_reduction", "checkpoint_bytes", "bytes_ratio", "flops_per_token",
            "flops_ratio", "prefill_tokens_per_s", "decode_tokens_per_s"]
    pct = {"expert_memory_reduction": lambda v: f"{100 * v:.1f}%", "accuracy_delta": lambda v: f"{100 * v:+.1f}",
           "checkpoint_bytes": lambda v: f"{v / 2**20:.0f} MiB", "flops_per_token": lambda v: f"{v / 1e6:.0f}M",
           "prefill_tokens_per_s": lambda v: f"{v:.0f}", "decode_tokens_per_s": lambda v: f"{v:.1f}"}
    status = ("**Partial**: rows not yet measured: " + ", ".join(missing) + f" (about {3 * len(missing)} to "
              f"{6 * len(missing)} CPU minutes more; `python bench/mcsmoe.py` resumes from the cache).\n\n"
              if missing else "")
    by = {r["name"]: r for r in rows}

    def cmp(a: str, b: str) -> str:
        if a in by and b in by:
            return f"{by[a]['mean_accuracy']:.3f} vs {by[b]['mean_accuracy']:.3f}"
        return "not measured yet"

    def moved(a: str) -> str:
        al = (by.get(a) or {}).get("alignment")
        return f"{al['moved']:,} of {al['neurons']:,}" if al else "(not measured yet)"

    return f"""{status}MC-SMoE (Merge, then Compress) on a {sc['model']} MoE of 4 experts: {len(TASKS)} upcycled
LoRA specialists ({', '.join(TASKS)}) and the base as a generalist expert, top-2, gate mode hidden plus
{sc['router_steps']} router-only steps. Accuracy: label log-likelihood on the first {sc['limit']} test examples of
each task (bf16 autocast); perplexity on {sc['ppl_docs']} news_corpus test documents. `expert_params` counts the
experts' parameters in the form that holds them: merged experts densely, compressed ones as low rank + kept sparse
entries (what a low-rank + sparse kernel stores). `checkpoint_bytes` is the written model.safetensors, which stores
compressed experts as their dense product so plain transformers loads it: it shrinks with the expert count
(merging), not with the compression. `flops_per_token` counts 2 x the multiply-accumulates of the weight matmuls per
token (attention projections, router, the top-2 experts, the head; attention scores left out), compressed experts at
their factored cost.

{md_table(rows, cols, pct)}

- Usage-weighted + aligned merging vs uniform merging at 2 experts: {cmp('m-smoe-g2', 'uniform-g2')};
  vs pruning the least used: {cmp('m-smoe-g2', 'prune-g2')}; with vs without alignment: {cmp('m-smoe-g2',
  'noalign-g2')}. At 1 expert: {cmp('m-smoe-g1', 'uniform-g1')} (uniform), {cmp('m-smoe-g1', 'prune-g1')} (prune),
  {cmp('m-smoe-g1', 'noalign-g1')} (no alignment). Alignment moved {moved('m-smoe-g2')} of the upcycled experts'
  neurons: they share the base's neuron order. With every expert's neurons shuffled first (the same MoE function),
  with vs without alignment: {cmp('m-smoe-g2-permuted', 'noalign-g2-permuted')} (alignment moved
  {moved('m-smoe-g2-permuted')}).
- MC-SMoE (2 experts, rank {row_config('mc-smoe-g2', sc).low_rank}, sparsity 0.8) without vs with
  {row_config('mc-smoe-g2-recover', sc).recover} recovery steps: {cmp('mc-smoe-g2', 'mc-smoe-g2-recover')}.
- Alignment is function-preserving: tests/test_mcsmoe.py permutes every expert to expert 0 by weight matching and
  checks the logits to 1e-5.

Group counts, recovery losses and each row's config are in the JSON. Router training of the MoE:
{(moe_info or {}).get('router_training')}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from the cached rows")
    a = ap.parse_args()
    sc = scale(a.quick)
    # committed rows; the "moe" row describes the built checkpoint, which build_moe rebuilds where it is missing
    cache = RowCache("mcsmoe", sc["tag"], committed=True)
    names = [n for n in a.rows.split(",") if n] or list(ROWS)
    for n in names:
        if n not in ROWS:
            raise SystemExit(f"unknown row {n!r}; rows: {', '.join(ROWS)}")
    if not a.page_only:
        moe_dir = build_moe(sc, cache)
        for n in names:
            log(f"row {n}")
            cache.run(f"row-{n}", lambda n=n: measure(n, sc, moe_dir))
            if not a.quick:
                write_page(cache, sc)  # after every row: an interrupted study leaves a true partial page
    text = write_page(cache, sc, write=not a.quick)
    if a.quick:  # a smoke run: the page is printed, docs/benchmarks is left alone
        print(text)


def write_page(cache: RowCache, sc: dict, write: bool = True) -> str:
    rows = [r for n in ROWS if (r := cache.get(f"row-{n}")) is not None]
    missing = [n for n in ROWS if cache.get(f"row-{n}") is None]
    text = page(rows, missing, sc, cache.get("moe"))
    if write and rows:  # no page before the first measured row
        write_results("mcsmoe", rows, text, extra={"partial": bool(missing), "missing_rows": missing},
                      cmd="python bench/mcsmoe.py")  # also when --page-only or --rows rewrites it
    return text


if __name__ == "__main__":
    main()
