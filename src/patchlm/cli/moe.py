"""Commands: `patchlm moe upcycle` (specialists -> a Mixtral-style MoE checkpoint; options or a mergekit-moe YAML).

Its options are generated from MoeConfig (patchlm.moe.config): every default and help text lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.moe.config import MoeConfig

moe_app = typer.Typer(no_args_is_help=True, help="Mixture-of-Experts: upcycle specialists into a Mixtral MoE.")


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


def register(app: typer.Typer) -> None:
    app.add_typer(moe_app, name="moe")
