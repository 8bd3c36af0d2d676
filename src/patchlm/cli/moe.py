"""Commands: `patchlm moe upcycle` (specialists -> a Mixtral-style MoE checkpoint; options or a mergekit-moe YAML)
and `patchlm moe compress` (MC-SMoE: merge experts by routing statistics, then low-rank + sparse, recovery).

Their options are generated from MoeConfig and CompressConfig (patchlm.moe.config): every default and help text
lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.moe.config import CompressConfig, MoeConfig

moe_app = typer.Typer(no_args_is_help=True,
                      help="Mixture-of-Experts: upcycle specialists into a Mixtral MoE; compress one (MC-SMoE).")


@moe_app.command("upcycle")
@config_command(Group(MoeConfig, panel="MoE (MoeConfig)"))
def upcycle_cmd(cv: ConfigValues,
                config: Annotated[Path | None, typer.Argument(
                    help="mergekit-moe YAML (or give --base and --patch / --model)")] = None,
                out: Annotated[Path, typer.Option("--out", "-o", help="output checkpoint directory")] = ...,
                base: Annotated[str | None, typer.Option(
                    "--base", help="base model: attention, norms and embeddings donor; routers computed on it")] = None,
                patch: Annotated[list[Path] | None, typer.Option(
                    "--patch", "-p", help="specialist: a patch dir (repeat); patches come first, then --model")] = None,
                model: Annotated[list[str] | None, typer.Option(
                    "--model", "-m", help="specialist: a dense checkpoint dir of the base's architecture (repeat)")
                    ] = None,
                task: Annotated[list[str] | None, typer.Option(
                    "--task", "-t", help="each specialist's task, in order (prompts and router training; "
                                         "patches default to the task they were trained on)")] = None,
                force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
                json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """Upcycle specialists (patches or dense checkpoints of one base) into a Mixtral MoE checkpoint.

    Example: `patchlm moe upcycle --base tiny-random-llama -p runs/a/patch -p runs/b/patch --gate-mode hidden
    --top-k 2 --out runs/moe`. A mergekit-moe config runs unchanged: `patchlm moe upcycle moe.yml --out runs/moe`.
    """
    from patchlm.errors import ConfigError
    from patchlm.moe.recipe import load_moe_recipe
    from patchlm.moe.train import train_routers
    from patchlm.moe.upcycle import Expert, save_upcycled, upcycle
    from patchlm.paths import check_output

    check_output(out, force)
    if config is not None:
        if base or patch or model:
            raise ConfigError("give either a mergekit-moe config or --base / --patch / --model, not both")
        base_ref, experts, fields = load_moe_recipe(config)
        cfg = MoeConfig(**{**cv.values(MoeConfig), **fields, **cv.given(MoeConfig)})
    else:
        if not base:
            raise ConfigError("no base model: give --base (or a mergekit-moe config)")
        sources = [str(p) for p in (patch or [])] + list(model or [])
        if not sources:
            raise ConfigError("no specialists: give --patch or --model (repeat)")
        base_ref, experts = base, [Expert(source=s) for s in sources]
        cfg = MoeConfig(**cv.values(MoeConfig))
    if task:
        if len(task) != len(experts):
            raise ConfigError(f"--task given {len(task)} times for {len(experts)} specialists: one per specialist")
        for e, t in zip(experts, task):
            e.task = t
    up = upcycle(base_ref, experts, cfg, log=status)
    if cfg.router_steps:
        up.report["router_training"] = train_routers(up.model, up.tokenizer, up.report["expert_tasks"], cfg,
                                                     log=status)
    save_upcycled(up, out, force=force)
    up.report["out"] = str(out)
    if json_out:
        print_json(up.report)
        return
    status(f"wrote {out}")
    print_table([up.report], ["gate_mode", "top_k", "shared", "dtype", "total_params", "active_params"],
                f"MoE of {len(experts)} experts")


@moe_app.command("compress")
@config_command(Group(CompressConfig, panel="MC-SMoE (CompressConfig)"))
def compress_cmd(cv: ConfigValues,
                 moe_dir: Annotated[Path, typer.Argument(
                     help="a Mixtral-style MoE checkpoint (e.g. from moe upcycle)")],
                 task: Annotated[list[str], typer.Option(
                     "--task", "-t", help="task data for routing statistics and recovery (repeat)")] = ...,
                 out: Annotated[Path, typer.Option("--out", "-o", help="output checkpoint directory")] = ...,
                 force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
                 json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """Merge the experts of an MoE by routing statistics, optionally compress them (low rank + sparse) and recover
    by distillation; writes a smaller Mixtral checkpoint that plain transformers loads.

    Example: `patchlm moe compress runs/moe --task rotten_tomatoes --groups 2 --low-rank 8 --sparsity 0.9
    --recover 50 --out runs/moe-small`.
    """
    from patchlm.data import load_task
    from patchlm.moe.mcsmoe import compress, load_moe, save_compressed
    from patchlm.paths import check_output

    check_output(out, force)
    cfg = CompressConfig(**cv.values(CompressConfig))
    for t in task:
        load_task(t)  # an unknown task fails here, before the model loads
    model, tokenizer = load_moe(moe_dir)
    result = compress(model, tokenizer, task, cfg, progress=True, log=status)
    save_compressed(result, tokenizer, out, force=force)
    rep = {**result.report, "out": str(out), "checkpoint_bytes": (out / "model.safetensors").stat().st_size}
    if json_out:
        print_json(rep)
        return
    status(f"wrote {out}")
    print_table([rep], ["experts_before", "experts_after", "expert_params_before", "expert_params",
                        "expert_memory_reduction", "checkpoint_bytes"], "MC-SMoE")


def register(app: typer.Typer) -> None:
    app.add_typer(moe_app, name="moe")
