"""Commands: models, data, info, eval, export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_patches, load_task_opts, print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.data.config import DataConfig
from patchlm.errors import ConfigError
from patchlm.evaluate.config import EvalConfig


def models(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the built-in base models.

    Example: `patchlm models --json`
    """
    from patchlm.models import list_models

    rows = list_models()
    if json_out:
        print_json(rows)
    else:
        print_table(rows, ["name", "params", "kind", "installed", "cached", "description"], "built-in models")


def data(ctx: typer.Context,
         json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
         sizes: Annotated[bool, typer.Option("--sizes", help="load each dataset to count its splits (slower)")] = False
         ) -> None:
    """List the built-in datasets (tasks); `patchlm data export-harness` writes them as lm-eval tasks.

    Example: `patchlm data --json`
    """
    if ctx.invoked_subcommand is not None:
        return
    from patchlm.data import list_tasks, load_task

    rows = list_tasks()
    if sizes:
        for r in rows:
            r["sizes"] = load_task(r["name"]).info().get("sizes")
    if json_out:
        print_json(rows)
    else:
        for r in rows:
            r["labels"] = ", ".join(r.get("labels") or []) or "-"
        print_table(rows, ["name", "kind", "labels", "description"], "built-in datasets")


def info(patch: Annotated[Path, typer.Argument(help="patch directory")],
         json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Show a patch: kind, base, trainable parameters, spec, metrics.

    Example: `patchlm info runs/demo/patch --json`
    """
    from patchlm.patch import Patch

    d = Patch.load(patch).info()
    if json_out:
        print_json(d)
    else:
        for k in ("kind", "base", "trainable_params", "file_bytes", "num_tensors", "metrics"):
            typer.echo(f"{k}: {d.get(k)}")
        for k, v in d.items():
            if k not in ("kind", "base", "trainable_params", "file_bytes", "num_tensors", "metrics", "spec",
                         "provenance", "path", "format_version"):
                typer.echo(f"{k}: {v}")


@config_command(Group(EvalConfig), Group(DataConfig, panel="Data checks (DataConfig)"))
def eval_cmd(cv: ConfigValues,
             model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
             task: Annotated[str, typer.Option("--task", "-t", help="built-in task or a local data file")],
             patch: Annotated[list[Path] | None, typer.Option("--patch", "-p", help="patch dir(s) to apply")] = None,
             text_column: Annotated[str | None, typer.Option(help="text column of a local file")] = None,
             label_column: Annotated[str | None, typer.Option(help="label column of a local file")] = None,
             force: Annotated[bool, typer.Option("--force", help="apply a patch made for another base")] = False,
             json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False) -> None:
    """Evaluate a base model, optionally with patches: accuracy/macro-F1 or perplexity.

    Example: `patchlm eval --model smollm2-135m --task rotten_tomatoes --patch runs/demo/patch --limit 200 --json`
    """
    from patchlm.evaluate import evaluate
    from patchlm.models import load_base
    from patchlm.patch import stack_order

    ec = EvalConfig(**cv.values(EvalConfig))
    split, limit = ec.split, ec.limit
    t = load_task_opts(task, seed=ec.seed, text_column=text_column, label_column=label_column,
                       checks=DataConfig(**cv.values(DataConfig)))
    patches = load_patches(patch)
    base = load_base(model)
    # weight patches (LoRA, MoS, merged, ...) first, then depth patches (drop, router), each stage in the given order
    for p in stack_order(patches):
        p.apply(base, force=force)
    t0 = time.perf_counter()
    res = evaluate(base.model, base.tokenizer, t, split=split, limit=limit, batch_size=ec.batch_size, bf16=ec.bf16,
                   max_length=ec.max_length)
    res.update({"model": model, "task": t.name, "patch": [str(p) for p in (patch or [])] or None,
                "seconds": round(time.perf_counter() - t0, 3)})
    if json_out:
        print_json(res)
    else:
        print_table([res], [k for k in ("accuracy", "macro_f1", "perplexity", "n", "seconds") if k in res],
                    f"{model} on {t.name} ({split})")


def export(patch: Annotated[Path, typer.Argument(help="patch directory")],
           out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
           fmt: Annotated[str, typer.Option(
               "--format", help="peft (adapter dir) | merged (full HF checkpoint)")] = "peft",
           model: Annotated[str | None, typer.Option(
               help="base for --format merged (default: the patch's base)")] = None,
           force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False) -> None:
    """Export a patch: as a PEFT LoRA adapter, or merged into its base as a Hugging Face checkpoint.

    Example: `patchlm export runs/demo/patch --format peft --out runs/demo/peft`
    """
    from patchlm.patch import Patch
    from patchlm.paths import check_output

    check_output(out, force)
    p = Patch.load(patch)
    if fmt == "peft":
        from patchlm.adapters.peft_io import export_peft

        export_peft(p, out, force=force)
    elif fmt == "merged":
        from patchlm.adapters.lora import bake_lora
        from patchlm.adapters.peft_io import to_lora_patch
        from patchlm.models import load_base
        from patchlm.models.export import save_hf_checkpoint
        from patchlm.patch import kind_can

        if not kind_can(p.kind, "export-merged"):
            raise ConfigError(f"a {p.kind} patch cannot be baked into a plain transformers checkpoint (its kind "
                              "does not declare export-merged); use --format peft")
        p = to_lora_patch(p)
        base = load_base(model or p.base["name"])
        p.apply(base, force=force)
        bake_lora(base.model)
        save_hf_checkpoint(base.model, base.tokenizer, out, force=force)
    else:
        raise ConfigError(f"unknown export format {fmt!r}; choices: peft, merged")
    status(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    from patchlm.cli.harness import export_harness

    data_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, rich_markup_mode="markdown")
    data_app.callback()(data)
    data_app.command("export-harness")(export_harness)
    app.add_typer(data_app, name="data")
    app.command("info")(info)
    app.command("eval")(eval_cmd)
    app.command("export")(export)
