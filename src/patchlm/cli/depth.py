"""Commands: `patchlm drop score|apply` (LLM-Drop) and `patchlm skip train|stats` (MindSkip routers).

Their hyper-parameter options are generated from `DropConfig` and `SkipConfig` (patchlm.depth.config), so every
default and help text lives in those dataclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_patches, print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.depth.config import DropConfig, SkipConfig

drop_app = typer.Typer(no_args_is_help=True, help="LLM-Drop: score modules and drop attention / MLP / blocks.")
skip_app = typer.Typer(no_args_is_help=True, help="MindSkip: train routers that skip attention per sequence.")

CALIBRATION = ("calib", "samples", "seq_len", "batch_size", "bf16")  # the DropConfig fields scoring needs


def apply_patches(base, paths: list[Path] | None, force: bool = False) -> list:
    """Load and apply patches in stack order (weight patches first, then depth patches; each stage in the order
    given). Fingerprints are checked against the base's weights at load time."""
    from patchlm.patch import stack_order

    patches = load_patches(paths)
    for p in stack_order(patches):
        p.apply(base, force=force)
    return patches


def _load(model: str, patch, force: bool):
    from patchlm.models import load_base

    load_patches(patch)  # read patches before the model loads: a bad path or stack fails fast
    base = load_base(model)
    apply_patches(base, patch, force)
    return base


@drop_app.command("score")
@config_command(Group(DropConfig, only=CALIBRATION))
def score(cv: ConfigValues,
          model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
          patch: Annotated[list[Path] | None, typer.Option("--patch", "-p",
                                                           help="patch(es) to apply first (LoRA, merged...)")] = None,
          force: Annotated[bool, typer.Option("--force", help="apply patches made for another base")] = False,
          json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Similarity of every attention module, MLP module and block (higher = changes its input less).

    Example: `patchlm drop score --model smollm2-135m --calib news_corpus --samples 16 --json`
    """
    from patchlm.depth.scores import calibration_blocks, similarity_scores

    cfg = DropConfig(**cv.values(DropConfig))
    base = _load(model, patch, force)
    blocks = calibration_blocks(base.tokenizer, cfg.calib, cfg.samples, cfg.seq_len)
    sc = similarity_scores(base.model, blocks, batch_size=cfg.batch_size, bf16=cfg.bf16)
    if json_out:
        print_json(sc)
    else:
        rows = [{"layer": i, "attention": sc["attention"][i], "mlp": sc["mlp"][i], "block": sc["block"][i]}
                for i in range(len(sc["block"]))]
        print_table(rows, ["layer", "attention", "mlp", "block"], f"{model}: cosine similarity (input vs output)")


@drop_app.command("apply")
@config_command(Group(DropConfig))
def apply(cv: ConfigValues,
          model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
          out: Annotated[Path, typer.Option("--out", "-o", help="where to write the drop patch")],
          layers: Annotated[str | None, typer.Option(
              help="explicit plan instead of scores, e.g. 'attention=3,5;mlp=7;block=20'")] = None,
          patch: Annotated[list[Path] | None, typer.Option(
              "--patch", "-p", help="patch(es) to apply before scoring (LoRA, merged...)")] = None,
          export_hf: Annotated[Path | None, typer.Option(
              "--export-hf", help="also write a HF checkpoint without the dropped blocks")] = None,
          force: Annotated[bool, typer.Option("--force",
                                              help="overwrite outputs / apply patches made for another base")] = False,
          json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False) -> None:
    """Choose modules to drop from their scores and write a `drop` patch (apply it with `patchlm eval --patch`).

    Example: `patchlm drop apply --model smollm2-135m --attn 8 --method one-shot --out runs/drop8`

    Blocks, exported as a smaller checkpoint:
    `patchlm drop apply -m smollm2-135m --blocks 4 --out runs/b4 --export-hf runs/b4-hf`
    """
    from patchlm.depth.drop import TYPES, drop_patch, make_plan, validate_plan
    from patchlm.depth.scores import calibration_blocks, similarity_scores
    from patchlm.errors import ConfigError
    from patchlm.paths import check_output

    cfg = DropConfig(**cv.values(DropConfig))
    check_output(out, force)
    if export_hf is not None:
        check_output(export_hf, force)
    explicit = _parse_plan(layers) if layers else None
    if explicit is not None and (cfg.attn or cfg.mlp or cfg.blocks or cfg.modules):
        raise ConfigError("--layers gives the plan: do not combine it with --attn/--mlp/--blocks/--modules")
    base = _load(model, patch, force)
    blocks_t = calibration_blocks(base.tokenizer, cfg.calib, cfg.samples, cfg.seq_len)
    if explicit is not None:
        plan = validate_plan(explicit, base.num_layers)
        scores = similarity_scores(base.model, blocks_t, batch_size=cfg.batch_size, bf16=cfg.bf16)
        method = "explicit"
    else:
        plan, scores = make_plan(base.model, blocks_t, cfg.method, attn=cfg.attn, mlp=cfg.mlp, blocks=cfg.blocks,
                                 modules=cfg.modules, batch_size=cfg.batch_size, bf16=cfg.bf16, log=status)
        method = cfg.method
    calib_d = {"task": cfg.calib, "samples": int(blocks_t.shape[0]), "seq_len": cfg.seq_len}
    p = drop_patch(base, plan, scores, method, calib_d, on_patches=[str(x) for x in (patch or [])])
    if export_hf is not None:
        from patchlm.adapters.lora import bake_lora
        from patchlm.depth.drop import export_hf as do_export

        a, m = set(plan["attention"]), set(plan["mlp"])
        if a - set(plan["block"]) or m - set(plan["block"]):
            raise ConfigError("--export-hf writes whole-block drops only; this plan also drops single sub-layers "
                              "(use --blocks N)")
        bake_lora(base.model)
        do_export(base.model, base.tokenizer, plan["block"], export_hf, force=force)
    p.save(out, force=force)
    res = {**{t: plan[t] for t in TYPES}, "method": method, "patch": str(out),
           "export_hf": str(export_hf) if export_hf else None}
    if json_out:
        print_json(res)
    else:
        status(f"wrote {out}: drops attention {plan['attention']}, mlp {plan['mlp']}, blocks {plan['block']}"
               + (f"; checkpoint {export_hf}" if export_hf else ""))


def _parse_plan(text: str) -> dict:
    from patchlm.errors import ConfigError

    plan = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"cannot read --layers {text!r}: use 'attention=3,5;mlp=7;block=20'")
        k, v = part.split("=", 1)
        k = {"attn": "attention", "blocks": "block"}.get(k.strip(), k.strip())
        try:
            plan[k] = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"cannot read layer indices {v!r} in --layers") from None
    return plan


@skip_app.command("train")
@config_command(Group(SkipConfig, rename={"lam": "lambda"}))
def skip_train(cv: ConfigValues,
               model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
               out: Annotated[Path, typer.Option("--out", "-o", help="where to write the router patch")],
               task: Annotated[str, typer.Option("--task", "-t",
                                                 help="instruction data (chat objective)")] = "sharegpt",
               layers: Annotated[str | None, typer.Option(
                   help="routed layers, e.g. '14-28' (instead of --last)")] = None,
               patch: Annotated[list[Path] | None, typer.Option(
                   "--patch", "-p", help="patch(es) to apply first (LoRA, merged, drop...)")] = None,
               force: Annotated[bool, typer.Option("--force",
                                                   help="overwrite OUT / apply patches made for another base")] = False,
               resume: Annotated[bool, typer.Option("--resume",
                                                    help="continue an interrupted training from OUT.ckpt")] = False,
               quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
               json_out: Annotated[bool, typer.Option("--json", help="print the patch info as JSON")] = False) -> None:
    """Train MindSkip routers (base frozen, routers only) and write a `router` patch.

    Training checkpoints to OUT.ckpt every --save-every steps; after an interruption the same command with
    --resume continues from there. OUT.ckpt is removed once OUT is written.

    Example: `patchlm skip train --model smollm2-135m --samples 1000 --target 0.3 --bf16 --out runs/skip`
    """
    import shutil

    from patchlm.data import load_task
    from patchlm.depth.skip import check_resumable, default_layers, parse_layers, train_routers
    from patchlm.errors import ConfigError
    from patchlm.paths import check_output

    cfg = SkipConfig(**cv.values(SkipConfig))
    check_output(out, force and not resume)
    ckpt = out.with_name(out.name + ".ckpt")
    if layers and cfg.last is not None:
        raise ConfigError("give --layers or --last, not both")
    if resume and force:
        raise ConfigError("give --resume (continue) or --force (start over), not both")
    if resume:
        check_resumable(ckpt)
    elif ckpt.exists() and not force:
        raise ConfigError(f"an interrupted router training is in {ckpt}; pass --resume to continue it or --force "
                          "to start over")
    t = load_task(task, seed=cfg.seed)
    base = _load(model, patch, force)
    n = base.num_layers
    chosen = parse_layers(layers, n) if layers else default_layers(n, cfg.last)
    if force and not resume and ckpt.exists():
        shutil.rmtree(ckpt)
    p = train_routers(base, t, chosen, cfg.granularity, cfg, log=status, progress=not quiet, checkpoint_dir=ckpt,
                      resume=resume)
    p.spec["on_patches"] = [str(x) for x in (patch or [])]
    p.save(out, force=force)
    shutil.rmtree(ckpt, ignore_errors=True)
    info = p.info()
    if json_out:
        print_json(info)
    else:
        status(f"wrote {out}: routers on layers {chosen}, capacity {p.metrics['final_capacity']:.2f}, "
               f"LM loss {p.metrics['first_lm_loss']:.3f} -> {p.metrics['final_lm_loss']:.3f}")


@skip_app.command("stats")
def skip_stats(model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
               patch: Annotated[list[Path], typer.Option("--patch", "-p",
                                                         help="router patch (and patches to apply first)")],
               task: Annotated[str, typer.Option("--task", "-t",
                                                 help="task whose prompts are routed")] = "rotten_tomatoes",
               limit: Annotated[int, typer.Option(help="examples of the test split")] = 64,
               bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast")] = False,
               force: Annotated[bool, typer.Option("--force", help="apply patches made for another base")] = False,
               json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Fraction of sequences that run each routed attention layer on a task's prompts, and the prefill speed bound.

    The bound is analytic (FLOPs of the matrix products, one prompt of the examples' mean length, logits for the
    last position): the speedup if every routed attention were skipped, and the speedup this executed fraction
    gives if time saved is proportional to attentions skipped.

    Example: `patchlm skip stats --model smollm2-135m --patch runs/skip --task rotten_tomatoes --json`
    """
    from patchlm.data import load_task
    from patchlm.data.features import example_text
    from patchlm.depth.skip import reset_stats, route_stats, speed_bound, speedup_at
    from patchlm.errors import ConfigError
    from patchlm.evaluate import EvalConfig, evaluate

    if limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if not any(p.kind == "router" for p in load_patches(patch)):
        raise ConfigError(f"skip stats needs a router patch (from patchlm skip train) among --patch; got "
                          f"{', '.join(str(p) for p in patch)}")
    base = _load(model, patch, force)
    reset_stats(base.model)
    t = load_task(task)
    res = evaluate(base.model, base.tokenizer, t, split="test", limit=limit, bf16=bf16)
    st = route_stats(base.model)
    mean_executed = sum(st.values()) / max(1, len(st))
    lengths = [min(len(base.tokenizer(example_text(t, e, base.tokenizer), add_special_tokens=False)["input_ids"]),
                   EvalConfig.max_length) for e in t.split("test")[:limit]]
    seq_len = max(1, round(sum(lengths) / max(1, len(lengths))))
    bound = speed_bound(base.model.config, st, seq_len)
    out = {"executed_fraction": {str(k): v for k, v in st.items()},
           "mean_executed": mean_executed,
           "prefill_speed_bound": {"seq_len": seq_len, "bound": bound["bound"],
                                   "at_mean_executed": speedup_at(bound["bound"], mean_executed),
                                   "attention_share_of_layer": bound["attention_share_of_layer"],
                                   "head_share": bound["head_share"]},
           **{k: res[k] for k in ("accuracy", "perplexity") if k in res}}
    if json_out:
        print_json(out)
    else:
        print_table([{"layer": k, "executed": v} for k, v in st.items()], ["layer", "executed"], "MindSkip routing")
        status(f"prefill speed bound (FLOPs, {seq_len} tokens): {bound['bound']:.3f}x with every routed attention "
               f"skipped, {out['prefill_speed_bound']['at_mean_executed']:.3f}x at the mean executed fraction "
               f"{mean_executed:.2f}")


def register(app: typer.Typer) -> None:
    app.add_typer(drop_app, name="drop")
    app.add_typer(skip_app, name="skip")
