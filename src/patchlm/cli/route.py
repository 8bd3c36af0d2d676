"""Commands: `patchlm route library add|list`, `patchlm route gates`, `patchlm route eval` (routing over a library).

Options are generated from `RouteConfig` (patchlm.route.config), so every default lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_task_opts, print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.route.config import RouteConfig

route_app = typer.Typer(no_args_is_help=True, help="Route inputs over a library of patches: GLIDER, Phatgoose, "
                                                   "Arrow and baselines.")
library_app = typer.Typer(no_args_is_help=True, help="A patch library: LoRA experts of one base with descriptions.")

GATE_FIELDS = ("gate_steps", "gate_lr", "gate_batch_size", "gate_max_length", "bf16", "seed")
EVAL_EXCLUDE = ("gate_steps", "gate_lr", "gate_batch_size", "gate_max_length")


@library_app.command("add")
def library_add(
    library: Annotated[Path, typer.Argument(help="the library directory (created when new)")],
    patch: Annotated[Path, typer.Argument(help="a LoRA patch directory (MoS: added in its LoRA form)")],
    description: Annotated[str, typer.Option("--description", "-d", help="what task the expert serves")],
    examples: Annotated[Path | None, typer.Option(
        "--examples", help="example inputs: .jsonl (strings or {\"text\": ...}) or one per line")] = None,
    name: Annotated[str | None, typer.Option("--name", help="the expert's name [the patch directory's]")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", "-t", help="the expert's training task (built-in or file): gates train on it, the oracle knows "
                             "it")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an expert of the same name")] = False,
) -> None:
    """Add PATCH to LIBRARY as an expert with its task description and example inputs.

    Example: `patchlm route library add lib runs/trec/patch --description "question types" --examples trec.txt
    --task trec`
    """
    from patchlm.route.library import Library, read_examples

    ex = read_examples(examples) if examples is not None else []
    lib = Library.open_or_create(library)
    e = lib.add(patch, description=description, examples=ex, name=name, task=task, force=force)
    status(f"added expert {e.name} ({e.kind}, {len(e.examples)} examples) to {library}: "
           f"{len(lib.experts)} expert(s)")


@library_app.command("list")
def library_list(
    library: Annotated[Path, typer.Argument(help="the library directory")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the experts of a library."""
    from patchlm.route.library import Library

    lib = Library.open(library)
    if json_out:
        print_json({"library": str(library), "id": lib.library_id, "base": lib.base, "experts": lib.rows()})
        return
    print_table(lib.rows(), ["name", "kind", "task", "examples", "description"],
                f"{library}: {len(lib.experts)} expert(s) of {(lib.base or {}).get('name')}")


def _load(library: Path, model: str | None):
    from patchlm.models import load_base
    from patchlm.route.library import Library

    lib = Library.open(library)
    lib.require_experts()
    base = load_base(model or lib.base["name"])
    lib.check_base(base)
    return lib, base


@route_app.command("gates")
@config_command(Group(RouteConfig, only=GATE_FIELDS, panel="Phatgoose gates (RouteConfig)"))
def gates(
    cv: ConfigValues,
    library: Annotated[Path, typer.Argument(help="the library directory")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model [the library's]")] = None,
    force: Annotated[bool, typer.Option("--force", help="train again over existing gates")] = False,
) -> None:
    """Train the Phatgoose gate of every expert (expert frozen) on its task; saved in LIBRARY/gates."""
    from patchlm.route import routed
    from patchlm.route.gates import train_gates

    cfg = RouteConfig(**cv.values(RouteConfig))
    lib, base = _load(library, model)
    tasks = {}
    for e in lib.experts:
        if e.task:
            tasks[e.name] = load_task_opts(e.task, seed=cfg.seed)
    routed.install(base.model, lib.patches())
    out = train_gates(base, lib, tasks, cfg, force=force, log=status)
    status(f"wrote gates of {len(lib.experts)} experts to {out}")


@route_app.command("eval")
@config_command(Group(RouteConfig, exclude=EVAL_EXCLUDE, panel="Routing (RouteConfig)"))
def evaluate(
    cv: ConfigValues,
    library: Annotated[Path, typer.Argument(help="the library directory")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="a task of the mixed stream (repeat the option); "
                                                                  "tasks without an expert count as held-out")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model [the library's]")] = None,
    gates_dir: Annotated[Path | None, typer.Option("--gates", help="gates directory [LIBRARY/gates]")] = None,
    expert: Annotated[str | None, typer.Option("--expert", help="router best: this expert [best on validation]")]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the row as JSON")] = False,
) -> None:
    """Evaluate a router over LIBRARY on a mixed stream of the tasks' test inputs (unlabeled by task).

    Example: `patchlm route eval lib --router glider --task trec --task sms_spam --limit 100`
    """
    from patchlm.route.evaluate import evaluate_router

    cfg = RouteConfig(**cv.values(RouteConfig))
    lib, base = _load(library, model)
    tasks = {t: load_task_opts(t, seed=cfg.seed) for t in dict.fromkeys(task)}
    merged = None
    if cfg.router == "merged":
        from patchlm.merge.patch_merge import merge_patches

        params = {"density": cfg.merge_density} if cfg.merge_method in ("ties", "dare_linear", "dare_ties") else {}
        merged = merge_patches(lib.patches(), cfg.merge_method, params=params, seed=cfg.seed)
    row = evaluate_router(base, lib, tasks, cfg, merged=merged, expert=expert, gates_path=gates_dir, log=status)
    if json_out:
        print_json(row)
        return
    cols = [k for k in row if k.startswith("acc_")] + ["held_in_mean", "held_out_mean", "routing_accuracy",
                                                        "tokens_per_s"]
    print_table([row], cols, f"router {cfg.router} over {len(lib.experts)} experts, top-{cfg.top_k} ({cfg.level})")


def register(app: typer.Typer) -> None:
    route_app.add_typer(library_app, name="library")
    app.add_typer(route_app, name="route")
