"""Commands: merge (checkpoints or patches; mergekit YAML or options), glue (Model-GLUE zoo selection), port (PortLLM).

The run knobs are generated from MergeConfig, MergePlan, GlueConfig and PortConfig: their defaults live there only.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.errors import ConfigError
from patchlm.merge.config import MergeConfig
from patchlm.merge.glue import HEURISTICS, GlueConfig
from patchlm.merge.methods import METHODS
from patchlm.merge.plan import MergePlan
from patchlm.merge.port import PortConfig

PLAN_OPTIONS = ("dtype", "out_dtype", "tokenizer_source", "seed")
# config fields set by the hand-written options below (the generated ones are found by patchlm.cli.options)
FIELD_FLAGS = {"weight": "--weight", "density": "--density", "gamma": "--gamma", "parameters": "--param",
               "heuristics": "--heuristic", "base_model": "--base", "models": "--model or --patch"}


@contextmanager
def _name_flags():
    """Library errors name config fields; add the hand-written option that sets the field."""
    try:
        yield
    except ConfigError as e:
        flag = FIELD_FLAGS.get(e.field or "")
        if flag and flag not in str(e):
            raise ConfigError(f"{e} (option {flag})", field=e.field) from e
        raise


@config_command(Group(MergeConfig, panel="Run (MergeConfig)"),
                Group(MergePlan, only=PLAN_OPTIONS, panel="Plan (as in a mergekit YAML)"))
def merge(cv: ConfigValues,
          config: Annotated[Path | None, typer.Argument(
              help="mergekit-format YAML (or give the options below)")] = None,
          out: Annotated[Path, typer.Option(
              "--out", "-o", help="output: a checkpoint dir, or a patch dir for --patch")] = ...,
          model: Annotated[list[str] | None, typer.Option(
              "--model", "-m", help="checkpoint dir or built-in name (repeat)")] = None,
          patch: Annotated[list[Path] | None, typer.Option(
              "--patch", "-p", help="patch dir (repeat): merge patches")] = None,
          base: Annotated[str | None, typer.Option(
              "--base", help="base model (task vectors are taken against it)")] = None,
          method: Annotated[str | None, typer.Option("--method", help=" | ".join(METHODS))] = None,
          weight: Annotated[list[float] | None, typer.Option(
              "--weight", "-w", help="per model, in order (or one for all)")] = None,
          density: Annotated[list[float] | None, typer.Option(
              "--density", "-d", help="per model: fraction kept")] = None,
          gamma: Annotated[list[float] | None, typer.Option(
              "--gamma", help="per model (breadcrumbs): top fraction dropped")] = None,
          param: Annotated[list[str] | None, typer.Option(
              "--param", help="shared parameter key=value, e.g. lambda=0.8, t=0.5")] = None,
          force: Annotated[bool, typer.Option(
              "--force", help="overwrite OUT; merge patches of different bases")] = False,
          json_out: Annotated[bool, typer.Option("--json", help="print a JSON report")] = False) -> None:
    """Merge fine-tuned checkpoints (streamed, tensor by tensor) or patches (exactly, through dW).

    A mergekit config runs unchanged: `patchlm merge ties.yml --out merged/`. The same with options:
    `patchlm merge --base smollm2-135m -m ft-a -m ft-b --method ties -w 0.5 -w 0.5 -d 0.5 --out merged/`.
    Patches: `patchlm merge -p runs/rt/patch -p runs/trec/patch --method ties -d 0.5 --rank 16 --out runs/merged`.
    """
    from patchlm.merge.plan import load_plan, parse_param, plan_from_options
    from patchlm.merge.runner import run_plan
    from patchlm.paths import check_output

    check_output(out, force)
    run = MergeConfig(**cv.values(MergeConfig))
    plan_opts = cv.values(MergePlan)
    given = {"--model": model, "--patch": patch, "--base": base, "--method": method, "--weight": weight,
             "--density": density, "--gamma": gamma, "--param": param,
             **{cv.flag(MergePlan, k): v for k, v in cv.given(MergePlan).items() if k != "seed"}}
    with _name_flags():
        if config is not None:
            clash = [k for k, v in given.items() if v]
            if clash:
                raise ConfigError(f"give either a config file or merge options, not both (got {config} and {clash[0]})")
            plan = load_plan(config)
            if "seed" in cv.given(MergePlan):
                plan.seed = plan_opts["seed"]
        else:
            if not method:
                raise ConfigError("no merge method: pass a config file or --method (e.g. --method ties)")
            if model and patch:
                raise ConfigError("merge either checkpoints (--model) or patches (--patch), not both")
            inputs = [str(p) for p in patch] if patch else list(model or [])
            if not inputs:
                raise ConfigError("nothing to merge: give --model (checkpoints) or --patch (patches)")
            params = dict(parse_param(p) for p in (param or []))
            plan = plan_from_options(inputs, method, base=base, weights=weight, densities=density, gammas=gamma,
                                     params=params, **plan_opts)
        report = run_plan(plan, out, run, force=force, progress=not json_out, log=status)
    if json_out:
        print_json(report)
    else:
        status(f"wrote {out}")
        print_table([report], [k for k in ("merge_method", "kind", "tensors", "shards", "refactor_rel_error",
                                           "seconds") if k in report], "merge")


@config_command(Group(GlueConfig, panel="Model-GLUE (GlueConfig)"))
def glue(cv: ConfigValues,
         patch: Annotated[list[Path], typer.Option("--patch", "-p", help="zoo member: patch dir (repeat)")],
         task: Annotated[list[str], typer.Option("--task", "-t", help="validation task(s) for scoring (repeat)")],
         out: Annotated[Path | None, typer.Option(
             "--out", "-o", help="write the best selection's merged patch here")] = None,
         heuristic: Annotated[list[str] | None, typer.Option(
             "--heuristic", help=f"{' | '.join(HEURISTICS)} (repeat; none given: every one)")] = None,
         force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
         json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """Model-GLUE: cluster a zoo of patches, select what to merge on validation data, report why.

    Example: `patchlm glue -p runs/rt/patch -p runs/trec/patch -p runs/bad/patch -t rotten_tomatoes -t trec
    --heuristic average --limit 50 --out runs/glue --json`
    """
    from patchlm.cli.common import load_task_opts
    from patchlm.merge.glue_runner import best_merge, run_glue
    from patchlm.models import load_base
    from patchlm.patch import Patch
    from patchlm.paths import check_output

    if out is not None:
        check_output(out, force)
    with _name_flags():
        cfg = GlueConfig(**cv.values(GlueConfig), **({"heuristics": tuple(heuristic)} if heuristic else {}))
        patches = [Patch.load(p) for p in patch]
        tasks = [load_task_opts(t) for t in task]
        base = load_base(patches[0].base["name"])
        names = [str(p) for p in patch]
        report = run_glue(base, patches, names, tasks, cfg, log=status)
        merged = best_merge(report, patches, names) if out is not None and cfg.mix is None else None
        if cfg.mix is not None:
            report["mix"] = _mix(base, report, patches, names, cfg, out, force)
    if merged is not None:
        merged.save(out, force=force)
        report["out"] = str(out)
    if json_out:
        print_json(report)
        return
    rows = []
    for m in report["members"]:
        row = {"member": m["name"], "family": m["family"], "validation": m["validation_score"]}
        for h, sel in report["heuristics"].items():
            row[h] = round(sel["weights"].get(m["name"], 0.0), 3)
        rows.append(row)
    print_table(rows, list(rows[0]), "Model-GLUE: coefficient of each member per heuristic (0 = left out)")
    for h, sel in report["heuristics"].items():
        typer.echo(f"{h}: score {sel['score']:.4f} ({sel['evaluations']} evaluations)")
    typer.echo(f"merge-all: score {report['merge_all']['score']:.4f}; best: {report['best']}")
    if report.get("mix"):
        typer.echo(f"mix: {report['mix']['why']}; wrote {report['mix'].get('out', '-')}")


def _mix(base, report: dict, patches, names, cfg: GlueConfig, out: Path | None, force: bool) -> dict:
    """Model-GLUE's last step: mix the merged families (patchlm.moe.mixtures); what was mixed and why."""
    from patchlm.merge.glue_runner import family_merges
    from patchlm.moe.mixtures import mix, save_mixture

    fams, why = family_merges(report, patches, names)
    tasks = [[t for t in (patches[names.index(n)].provenance.get("task") for n in f["members"]) if t] for f in why]
    model, rep = mix(base, fams, tasks, cfg.mix, prefix_layers=cfg.mix_layers, router_steps=cfg.mix_router_steps,
                     log=status)
    rep["merged"] = why
    rep["why"] = (f"{len(fams)} families stay apart at similarity threshold {cfg.threshold}: each is merged inside "
                  f"(merged_as), then the merges are mixed at {cfg.mix} level with routers")
    if out is not None:
        save_mixture(model, rep, out, force=force)
        rep["out"] = str(out)
    return rep


@config_command(Group(PortConfig, panel="Port (PortConfig)"))
def port(cv: ConfigValues,
         patch: Annotated[Path, typer.Argument(help="patch dir made on the old base")],
         to: Annotated[str, typer.Option("--to", help="the updated base: checkpoint dir or built-in name")],
         out: Annotated[Path, typer.Option("--out", "-o", help="output patch dir")],
         from_base: Annotated[str | None, typer.Option(
             "--from", help="the patch's original base (default: its recorded name)")] = None,
         force: Annotated[bool, typer.Option(
             "--force", help="port even when the new base does not look like an update; overwrite OUT")] = False,
         json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """PortLLM: re-target a patch to an updated base of the same architecture, without training.

    Example: `patchlm port runs/rt/patch --to runs/smollm2-evolved --out runs/rt-ported --json`
    """
    from patchlm.merge.port import port_patch
    from patchlm.patch import Patch
    from patchlm.paths import check_output

    check_output(out, force)
    cfg = PortConfig(**cv.values(PortConfig))
    p = Patch.load(patch)
    # the new base is inspected by streaming its checkpoint (module shapes, fingerprint), never trained on
    ported, report = port_patch(p, to, old_base=from_base, force=force, min_similarity=cfg.min_similarity)
    ported.save(out, force=force)
    report["out"] = str(out)
    if json_out:
        print_json(report)
    else:
        status(f"wrote {out}")
        print_table([report], ["old_fingerprint", "new_fingerprint", "similarity", "forced", "seconds"], "port")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("glue")(glue)
    app.command("port")(port)
