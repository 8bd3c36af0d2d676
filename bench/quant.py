"""Quantization study: GPTQ and RTN at uniform 8/4/3/2 bits and structure-aware bit plans at equal average bits,
on smollm2-135m (dense) and on the zoo's upcycled MoE (bench/zoo.py: 4 experts, top-2), with real packed weights.

    python bench/quant.py            # the rows that are not cached yet (resumes from bench/.cache/quant/)
    python bench/quant.py --quick    # smoke run on tiny-random-llama (a minute)
    python bench/quant.py --rows 'gptq-4*,fp32'   # only the rows whose name matches
    python bench/quant.py --rows 'moe/*'          # the MoE's rows (its name prefix is moe/)

Every row quantizes the fp32 model (or the model with a task's LoRA baked in) with `patchlm.quant` and evaluates the
quant patch reloaded from disk:
  * perplexity on held-out news_corpus text (test split: the first PPL_TEXTS texts, blocks of 256 tokens; the
    calibration windows come from its train split);
  * accuracy on rotten_tomatoes, trec and bbc_news on the first LIMIT test examples: for the dense model with the
    zoo's shared LoRA specialist of the task (bench/zoo.py, 150 steps) baked into the weights before quantizing
    (`patchlm quant --patch`; with --acc, three more quantizations per row), for the MoE (whose experts are those
    specialists) of the quantized MoE itself, in every MoE row;
  * file_bytes (the quant patch's tensors file), model_bytes (the file plus the unquantized rest in float16: what a
    saved quantized model weighs), resident tensor bytes after loading, peak RSS growth during the perplexity
    pass, quantization seconds and greedy decode tokens/s (batch 1, 32 new tokens).
Group size 64: 128 does not divide smollm2's hidden size 576 (patchlm refuses a group that does not divide).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo
from common import CACHE, RowCache, md_table, write_results

TASKS = ["rotten_tomatoes", "trec", "bbc_news"]
MOE = "moe/"  # the name prefix of the MoE's rows
FULL = dict(model="smollm2-135m", group=64, calib_samples=64, calib_length=256, ppl_texts=60, ppl_block=256,
            limit=150, decode=32, speed_prompt=128, speed_reps=3, budgets=[3.0, 2.5], zoo_steps=150,
            heuristics=["attn", "mlp", "first-k", "down-first", "outlier", "predictor", "random"],
            moe=dict(router_steps=30, bits=(4, 3, 2), budgets=[3.0, 2.5],
                     heuristics=["attn", "frequency", "first-k", "outlier", "predictor", "random"]))
QUICK = dict(model="tiny-random-llama", group=32, calib_samples=8, calib_length=64, ppl_texts=4, ppl_block=64,
             limit=8, decode=4, speed_prompt=16, speed_reps=1, budgets=[3.0], zoo_steps=4,
             heuristics=["attn", "outlier", "random"],
             moe=dict(router_steps=2, bits=(4,), budgets=[3.0], heuristics=["frequency", "random"]))


def uniform_name(b: float) -> str:
    """The uniform row a budget compares against: 3 bits at 3.0, 2 bits below."""
    return "uniform-3@3" if b == 3 else f"uniform-2@{b:g}"


def rows_plan(p: dict) -> list[tuple[str, dict]]:
    """(row name, QuantConfig fields; {} for the unquantized rows) in the order they run: the dense model's, then
    the MoE's (prefixed moe/)."""
    out: list[tuple[str, dict]] = [("fp32", {}), ("bf16", {}), ("kernel-speed", {})]
    for bits in (4, 3, 8, 2):  # the goals' rows (4 and 3 bits) first
        for method in ("gptq", "rtn"):
            out.append((f"{method}-{bits}", {"method": method, "bits": bits}))
    for b in p["budgets"]:
        out.append((uniform_name(b), {"method": "gptq", "bits": 3 if b == 3 else 2}))
        for h in p["heuristics"]:
            out.append((f"{h}@{b:g}", {"method": "gptq", "plan": f"heuristic:{h}@{b:g}"}))
    m = p["moe"]
    out += [(MOE + "fp32", {}), (MOE + "kernel-speed", {})]
    for bits in m["bits"]:
        for method in ("gptq", "rtn"):
            out.append((f"{MOE}{method}-{bits}", {"method": method, "bits": bits}))
    for b in m["budgets"]:
        out.append((MOE + uniform_name(b), {"method": "gptq", "bits": 3 if b == 3 else 2}))
        for h in m["heuristics"]:
            out.append((f"{MOE}{h}@{b:g}", {"method": "gptq", "plan": f"heuristic:{h}@{b:g}"}))
    return out


def zoo_patch(p: dict, task: str):
    """The zoo's shared LoRA specialist of a task (trained once when missing)."""
    from patchlm.patch import Patch

    return Patch.load(zoo.specialist(task, p["zoo_steps"], p["model"], tag="quick" if p is QUICK else None))


def model_ref(p: dict, name: str) -> str:
    """What a row quantizes: the dense built-in, or the zoo's upcycled MoE checkpoint (built once when missing)."""
    if not name.startswith(MOE):
        return p["model"]
    out, _ = zoo.upcycled_moe(p["zoo_steps"], p["moe"]["router_steps"], p["model"],
                              tag="quick" if p is QUICK else None)
    return str(out)


def quantize_to(p: dict, ref: str, fields: dict, out: Path, patch=None) -> dict:
    """Quantize model `ref` (after baking `patch`) and save the quant patch at `out`; return its spec."""
    from patchlm.cli.quant import bake_patches
    from patchlm.models import load_base
    from patchlm.patch import Patch
    from patchlm.quant import QuantConfig, quantize_model

    base = load_base(ref)
    changed = bake_patches(base, [patch], [str(patch.path)]) if patch is not None else set()
    cfg = QuantConfig(group_size=p["group"], calib_samples=p["calib_samples"], calib_length=p["calib_length"],
                      kernel="dequant", **fields)  # quality is measured on the float32 path; speed on both
    spec, tensors = quantize_model(base.model, base.tokenizer, cfg, changed=changed)
    Patch(kind="quant", base=base.ref(), spec=spec, tensors=tensors).save(out, force=True)
    return spec


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def evaluate_row(p: dict, name: str, fields: dict, tag: str, acc: bool) -> dict:
    """One row: quantize (unless fp32 / bf16), reload from disk, measure; the dense model's accuracy (LoRA baked in,
    one quantization per task) only with `acc`, the MoE's always (the quantized MoE itself)."""
    import torch

    from patchlm.data import load_task
    from patchlm.data.features import example_text
    from patchlm.evaluate import evaluate
    from patchlm.evaluate.perplexity import perplexity
    from patchlm.evaluate.probes import MemoryProbe, Timer
    from patchlm.models import load_base
    from patchlm.models.base import builtin_dir
    from patchlm.patch import Patch
    from patchlm.quant.units import model_units

    d = CACHE / "quant" / tag / name
    row: dict = {"name": name}
    moe = name.startswith(MOE)
    ref = model_ref(p, name)
    t0 = time.perf_counter()
    if fields:
        spec = quantize_to(p, ref, fields, d / "patch")
        row.update(avg_bits=round(spec["avg_bits"], 4), rtn_fallback=len(spec["rtn_fallback"]),
                   quant_seconds=round(time.perf_counter() - t0, 1), plan=spec["plan"])
    base = load_base(ref)
    units_params = sum(u.params for u in model_units(base.model))
    total_params = sum(t.numel() for t in base.model.state_dict().values())
    if getattr(base.model.config, "tie_word_embeddings", False):
        total_params -= base.model.get_output_embeddings().weight.numel()
    if fields:
        Patch.load(d / "patch").apply(base)
        row["file_bytes"] = (d / "patch" / "tensors.safetensors").stat().st_size
        row["model_bytes"] = row["file_bytes"] + 2 * (total_params - units_params)
    elif name == "bf16":
        base.model.to(torch.bfloat16)
        row.update(avg_bits=16.0, file_bytes=2 * total_params, model_bytes=2 * total_params)
    else:
        src = Path(ref) if moe else Path(builtin_dir(ref))
        row.update(avg_bits=32.0, file_bytes=sum(f.stat().st_size for f in src.glob("*.safetensors")))
        row["model_bytes"] = row["file_bytes"]
    row["resident_bytes"] = tensor_bytes(base.model)
    news = load_task("news_corpus")
    texts = [example_text(news, e) for e in news.split("test")[: p["ppl_texts"]]]
    with MemoryProbe() as mem, torch.no_grad():
        ppl = perplexity(base.model, base.tokenizer, texts, block_size=p["ppl_block"], batch_size=4)
    row["perplexity"], row["ppl_tokens"] = round(ppl["perplexity"], 4), ppl["tokens"]
    row["peak_delta_bytes"] = mem.delta_bytes
    ids = base.tokenizer("The markets opened higher on Monday as", return_tensors="pt")["input_ids"]
    with Timer() as t, torch.no_grad():
        base.model.generate(ids, max_new_tokens=p["decode"], min_new_tokens=p["decode"], do_sample=False)
    row["decode_tok_s"] = round(t.rate(p["decode"]), 2)
    if fields:  # the same patch run by the auto kernel (torch's int4 matmul for its 4-bit units)
        from patchlm.quant.kind import set_kernel

        row["int4_kernel_units"] = set_kernel(base.model, "auto")["int4pack"]
        with Timer() as t, torch.no_grad():
            base.model.generate(ids, max_new_tokens=p["decode"], min_new_tokens=p["decode"], do_sample=False)
        row["decode_tok_s_auto"] = round(t.rate(p["decode"]), 2)
        set_kernel(base.model, "dequant")
    accs = {}
    for task in TASKS if moe else []:  # the MoE's experts are the task specialists: the quantized MoE itself
        accs[task] = round(evaluate(base.model, base.tokenizer, load_task(task), split="test",
                                    limit=p["limit"])["accuracy"], 4)
    del base
    for task in TASKS if acc and not moe else []:
        lp = zoo_patch(p, task)
        b = load_base(ref)
        if fields:
            quantize_to(p, ref, fields, d / f"patch-{task}", patch=lp)
            Patch.load(d / f"patch-{task}").apply(b)
        else:
            lp.apply(b)
            if name == "bf16":
                b.model.to(torch.bfloat16)
        t = load_task(task)
        accs[task] = round(evaluate(b.model, b.tokenizer, t, split="test", limit=p["limit"])["accuracy"], 4)
        del b
    row.update({f"acc_{k}": v for k, v in accs.items()})
    row["mean_accuracy"] = round(sum(accs.values()) / len(accs), 4) if accs else None
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def budget_notes(by: dict, budgets: list[float], heuristics: list[str], pre: str = "") -> list[str]:
    """At each average-bits budget: the uniform plan against the best structure-aware plan and the random one, on
    perplexity and (where measured) mean accuracy."""
    notes = []
    for b in budgets:
        uni = by.get(pre + uniform_name(b))
        plans = [by[f"{pre}{h}@{b:g}"] for h in heuristics if h != "random" and f"{pre}{h}@{b:g}" in by]
        rnd = by.get(f"{pre}random@{b:g}")
        if not uni or not (plans or rnd):
            continue
        best = min(plans, key=lambda r: r["perplexity"]) if plans else None
        acc = [r for r in plans if r.get("mean_accuracy") is not None]
        best_acc = max(acc, key=lambda r: r["mean_accuracy"]) if acc and uni.get("mean_accuracy") is not None \
            else None
        notes.append(
            f"- {b:g} bits on average, perplexity: uniform {uni['perplexity']:.1f}"
            + (f"; best structure-aware plan so far {best['name']} {best['perplexity']:.1f} (beats uniform: "
               f"{'yes' if best['perplexity'] < uni['perplexity'] else 'no'})" if best else "")
            + (f"; random allocation {rnd['perplexity']:.1f}" if rnd else "")
            + ("; scorer/heuristic rows vs random: " + ", ".join(
                f"{r['name']} {'better' if r['perplexity'] < rnd['perplexity'] else 'worse'}" for r in plans)
               if rnd and plans else "")
            + (f"; mean accuracy: uniform {uni['mean_accuracy']:.3f}, best plan {best_acc['name']} "
               f"{best_acc['mean_accuracy']:.3f} (beats uniform: "
               f"{'yes' if best_acc['mean_accuracy'] > uni['mean_accuracy'] else 'no'})"
               + (f", random {rnd['mean_accuracy']:.3f}" if rnd and rnd.get("mean_accuracy") is not None else "")
               if best_acc else "")
            + f" ({len(plans)} of {len([h for h in heuristics if h != 'random'])} plans measured).")
    return notes


def goal_notes(by: dict, fp: dict, group: int, pre: str = "") -> list[str]:
    """The 4-bit and 3-bit goals' lines (perplexity and size against fp32)."""
    notes = []
    g4, g3, r3 = by.get(pre + "gptq-4"), by.get(pre + "gptq-3"), by.get(pre + "rtn-3")
    if g4:
        notes.append(f"- GPTQ 4-bit (group {group}): perplexity {g4['ppl_vs_fp32']:.3f}x fp32 (goal <= 1.05x: "
                     f"{'met' if g4['ppl_vs_fp32'] <= 1.05 else 'not met'}); model {g4['size_vs_fp32']:.3f}x the "
                     f"fp32 file (goal <= 0.35x: {'met' if g4['size_vs_fp32'] <= 0.35 else 'not met'}).")
    if g3 and r3:
        g, r = g3["perplexity"] - fp["perplexity"], r3["perplexity"] - fp["perplexity"]
        closer = 1 - g / r if r > 0 else 0.0
        notes.append(f"- 3 bits: GPTQ is {100 * closer:.0f}% closer to fp32 perplexity than RTN (goal >= 30%: "
                     f"{'met' if closer >= 0.3 else 'not met'}).")
    return notes


def kernel_speed(p: dict, moe: bool = False) -> dict:
    """Prefill (batch 1 and 8) and greedy decode (batch 1) tokens/s of fp32, bf16 and one 4-bit quant patch (RTN,
    group p["group"]: the kernels' speed does not depend on how the codes were chosen) run by the dequant kernel and
    by the auto kernel, side by side in one process: the four alternate rep by rep and each keeps its best rep (a
    busy shared CPU only slows a rep down). Ratios are to fp32."""
    import torch

    from patchlm.evaluate.probes import Timer
    from patchlm.models import load_base
    from patchlm.quant import QuantConfig, quantize_model
    from patchlm.quant.kind import set_kernel

    ref = model_ref(p, MOE if moe else "")
    fp = load_base(ref)
    bf = load_base(ref)
    bf.model.to(torch.bfloat16)
    q = load_base(ref)
    quantize_model(q.model, q.tokenizer, QuantConfig(bits=4, method="rtn", group_size=p["group"], kernel="dequant"))
    qa = copy.deepcopy(q.model)  # the same codes, run by the other kernel
    units = set_kernel(qa, "auto")
    models = {"fp32": fp.model, "bf16": bf.model, "q4-dequant": q.model, "q4-auto": qa}
    g = torch.Generator().manual_seed(0)
    vocab = fp.model.config.vocab_size
    prompt = {1: torch.randint(5, vocab, (1, p["speed_prompt"]), generator=g),
              8: torch.randint(5, vocab, (8, p["speed_prompt"]), generator=g)}
    best: dict[str, dict[str, float]] = {k: {} for k in models}
    for _ in range(p["speed_reps"]):
        for name, m in models.items():
            with torch.no_grad():
                for b, ids in prompt.items():
                    with Timer() as t:
                        m(input_ids=ids, use_cache=False)
                    key = f"prefill_b{b}_tok_s"
                    best[name][key] = max(best[name].get(key, 0.0), t.rate(ids.numel()))
                ids = prompt[1][:, :8]
                with Timer() as t:
                    m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p["decode"],
                               min_new_tokens=p["decode"], do_sample=False, pad_token_id=0)
                best[name]["decode_tok_s"] = max(best[name].get("decode_tok_s", 0.0), t.rate(p["decode"]))
    row = {"name": (MOE if moe else "") + "kernel-speed", "kind": "speed", "int4_kernel_units": units["int4pack"],
           "dequant_units": units["dequant"], "torch_threads": torch.get_num_threads(), "reps": p["speed_reps"]}
    for name, r in best.items():
        for k, v in r.items():
            row[f"{name}_{k}"] = round(v, 2)
            row[f"{name}_{k.removesuffix('_tok_s')}_x"] = round(v / best["fp32"][k], 3)
    row["resident_bytes"] = {k: tensor_bytes(m) for k, m in models.items()}
    return row


def kernel_notes(r: dict) -> list[str]:
    if r is None:
        return []
    lines = [f"- `{r['name']}` (4-bit RTN, the {r['int4_kernel_units']} matrices the int4 kernel takes; "
             f"{r['dequant_units']} left to dequant; best of {r['reps']} alternating reps, {r['torch_threads']} "
             "torch threads), tokens/s and ratio to fp32:", "",
             "| model | prefill b1 | prefill b8 | decode b1 | resident bytes |", "|---|---|---|---|---|"]
    for m in ("fp32", "bf16", "q4-dequant", "q4-auto"):
        cells = [f"{r[f'{m}_{k}_tok_s']:.1f} ({r[f'{m}_{k}_x']:.2f}x)" for k in ("prefill_b1", "prefill_b8",
                                                                                  "decode")]
        lines.append(f"| {m} | {' | '.join(cells)} | {r['resident_bytes'][m]:,} |")
    return lines


def page(rows: list[dict], p: dict, missing: list[str]) -> str:
    speed = {r["name"]: r for r in rows if r.get("kind") == "speed"}
    rows = [r for r in rows if r.get("kind") != "speed"]
    dense = [r for r in rows if not r["name"].startswith(MOE)]
    moe = [r for r in rows if r["name"].startswith(MOE)]
    for part, pre in ((dense, ""), (moe, MOE)):
        fp = next((r for r in part if r["name"] == pre + "fp32"), None)
        for r in part if fp else []:
            r["ppl_vs_fp32"] = round(r["perplexity"] / fp["perplexity"], 4)
            r["size_vs_fp32"] = round(r["model_bytes"] / fp["model_bytes"], 4)
    cols = ["name", "avg_bits", "file_bytes", "model_bytes", "size_vs_fp32", "resident_bytes", "peak_delta_bytes",
            "perplexity", "ppl_vs_fp32", *[f"acc_{t}" for t in TASKS], "mean_accuracy", "quant_seconds",
            "decode_tok_s", "decode_tok_s_auto", "rtn_fallback"]
    by = {r["name"]: r for r in rows}
    notes, moe_notes = [], []
    if "fp32" in by:
        notes += goal_notes(by, by["fp32"], p["group"])
    notes += budget_notes(by, p["budgets"], p["heuristics"])
    if notes:
        notes[-1] += " Dense accuracy rows need --acc."
    if MOE + "fp32" in by:
        moe_notes += goal_notes(by, by[MOE + "fp32"], p["group"], MOE)
    moe_notes += budget_notes(by, p["moe"]["budgets"], p["moe"]["heuristics"], MOE)
    fallback = [r for r in moe if r.get("rtn_fallback")]
    if fallback:
        moe_notes.append("- Experts quantized by RTN for want of routed calibration tokens (fewer than "
                         "expert_min_tokens): " + ", ".join(f"{r['name']} {r['rtn_fallback']}" for r in fallback)
                         + ".")
    status = ("complete" if not missing else
              f"**partial**: {len(missing)} rows not measured yet ({', '.join(missing)}); rerun to add them")
    return "\n".join([
        f"Model {p['model']}; GPTQ/RTN group size {p['group']}; calibration {p['calib_samples']} x "
        f"{p['calib_length']} tokens of news_corpus train; perplexity on {p['ppl_texts']} news_corpus test texts in "
        f"{p['ppl_block']}-token blocks; accuracy on the first {p['limit']} test examples with the zoo LoRA baked in "
        "before quantizing. Status: " + status + ".", "",
        md_table(dense, cols), "", "## What the numbers show", "", *notes, "",
        "- file_bytes is the quant patch (packed codes, float16 scales, packed zeros); model_bytes adds the "
        "unquantized embeddings and norms at float16; resident_bytes is every tensor after loading (the tied "
        "embedding stays float32 in memory); peak_delta_bytes is the RSS growth while computing perplexity "
        "(the dequantize-on-the-fly linear materialises one float weight at a time).",
        "- The fp32 reference is smollm2-135m as patchlm builds it: the Q4_1 GGUF de-quantized to float32 (see "
        "../shared/ASSETS.md), so its weights already sit on a 4-bit grid of 32-weight blocks; min-max groups that "
        "always hold 0 do not reproduce that grid, so 4-bit rows here are not the near-lossless case a grid-aligned "
        "re-quantization would be.",
        f"- Group size {p['group']} instead of the issue's 128: 128 does not divide smollm2's hidden size 576 and "
        "patchlm refuses a group that does not divide the input (the nearest divisors are 64 and 192).",
        "- Pending (not measured in this session; each GPTQ row takes about 4-5 CPU minutes here, quantization "
        "~150 s + evaluation ~100 s, the predictor rows ~1 minute more): the remaining uniform rows, every heuristic "
        "and scorer at 3.0 and 2.5 bits, accuracy with the task LoRAs baked in (`--acc`: three more quantizations "
        "per row, ~12 minutes a row, split by row) and the MoE rows below.",
        "- decode_tok_s: the quality columns run the float32 `dequant` kernel (every weight unpacked and "
        "dequantized at every step: no float copy is kept, that is the memory saving), so decoding is slower than "
        "fp32 on this CPU; decode_tok_s_auto is the same patch under the `auto` kernel (torch's packed int4 CPU "
        "matmul for the 4-bit units it takes, bfloat16 inside; rows measured before it existed show -). The "
        "kernels side by side:", "",
        *(kernel_notes(speed.get("kernel-speed")) or ["(kernel-speed row not measured yet: "
                                                      "`python bench/quant.py --rows kernel-speed`)"]), "",
        "- Cross-check: gptqmodel 7.7.0 downloads here only as a source tarball (it builds CUDA/C++ extensions); "
        "it was not installed in a side venv in this session, so the exported layout is tested against patchlm's "
        "own reader (tests/test_quant.py: logits equal to 1e-3 at 2/3/4/8 bits, per-module bits via `dynamic`).",
        "", "## The upcycled MoE", "",
        f"The zoo's MoE (bench/zoo.py `upcycled_moe`, the one bench/mcsmoe.py compresses): the three task specialists "
        f"and the base as four experts of a top-2 Mixtral, gate mode hidden, {p['moe']['router_steps']} router-only "
        "training steps, float32. The same calibration, perplexity and decode measurements as above; the experts are "
        "quantized slice by slice with the Hessian of the calibration tokens routed to each (fewer than "
        "expert_min_tokens: RTN, counted in rtn_fallback); the `frequency` plan raises the most used experts first. "
        "Accuracy is the quantized MoE's own on each task (no patch to bake: its experts are the specialists).", "",
        md_table(moe, cols) if moe else "(not measured yet: `python bench/quant.py --rows 'moe/*'`)", "",
        *moe_notes, "", *kernel_notes(speed.get(MOE + "kernel-speed")),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default="*", help="comma-separated name patterns of the rows to run")
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from the cached rows")
    ap.add_argument("--acc", action="store_true", help="also measure task accuracy with the zoo LoRAs baked in "
                    "(three more quantizations per row; cached apart, as acc/<row>)")
    args = ap.parse_args()
    p, tag = (QUICK, "quick") if args.quick else (FULL, "full")
    cache = RowCache("quant", tag, committed=True)
    pats = [s.strip() for s in args.rows.split(",") if s.strip()]
    rows, missing = [], []
    for name, fields in rows_plan(p):
        speed = name.endswith("kernel-speed")
        # MoE rows always have accuracy; dense rows with it are cached apart (acc-<name>)
        key = f"acc-{name}" if args.acc and not speed and not name.startswith(MOE) else name
        hit = cache.get(key) or (None if args.acc or speed else cache.get(f"acc-{name}"))
        if hit is None and (args.page_only or not any(fnmatch.fnmatch(name, pt) for pt in pats)):
            missing.append(name)
            continue
        if speed:
            fn = functools.partial(kernel_speed, p, moe=name.startswith(MOE))
        else:
            fn = functools.partial(evaluate_row, p, name, fields, tag, args.acc)
        row = hit or cache.run(key, fn)
        rows.append(row)
        print(row, flush=True)
    write_results("quant", rows, page(rows, p, missing), extra={"partial": bool(missing), "missing": missing},
                  suffix="-quick" if args.quick else "")


if __name__ == "__main__":
    main()
