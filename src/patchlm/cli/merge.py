"""Commands: merge (checkpoints or patches; mergekit YAML or options), glue (Model-GLUE zoo selection), port (PortLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from patchlm.cli.common import print_json, print_table, status
from patchlm.errors import ConfigError


def _size(text: str) -> int:
    """'2GB', '500M', '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError as e:
        raise ConfigError(f"--shard-size {text!r}: expected bytes such as 2GB or 500MB") from e


def merge(config: Annotated[Optional[Path], typer.Argument(help="mergekit-format YAML (or give the options below)")] = None,
          out: Annotated[Path, typer.Option("--out", "-o", help="output: a checkpoint dir, or a patch dir for --patch")] = ...,
          model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="checkpoint dir or built-in name (repeat)")] = None,
          patch: Annotated[Optional[list[Path]], typer.Option("--patch", "-p", help="patch dir (repeat): merge patches")] = None,
          base: Annotated[Optional[str], typer.Option("--base", help="base model (task vectors are taken against it)")] = None,
          method: Annotated[Optional[str], typer.Option("--method", help="linear | task_arithmetic | ties | dare_linear | "
                                                        "dare_ties | breadcrumbs | breadcrumbs_ties | fisher | slerp")] = None,
          weight: Annotated[Optional[list[float]], typer.Option("--weight", "-w", help="per model, in order (or one for all)")] = None,
          density: Annotated[Optional[list[float]], typer.Option("--density", "-d", help="per model: fraction kept")] = None,
          gamma: Annotated[Optional[list[float]], typer.Option("--gamma", help="per model (breadcrumbs): top fraction dropped")] = None,
          param: Annotated[Optional[list[str]], typer.Option("--param", help="shared parameter key=value, e.g. lambda=0.8, t=0.5")] = None,
          dtype: Annotated[Optional[str], typer.Option(help="float32 | bfloat16 | float16: inputs are read as")] = None,
          out_dtype: Annotated[Optional[str], typer.Option(help="dtype of the written weights (default: dtype)")] = None,
          tokenizer_source: Annotated[Optional[str], typer.Option(help="base or one of the models")] = None,
          rank: Annotated[Optional[int], typer.Option(help="patches: re-factorize the merge to a rank-r LoRA (SVD)")] = None,
          stack: Annotated[bool, typer.Option("--stack/--no-stack", help="patches: linear/task_arithmetic of LoRAs as one exact stacked LoRA")] = True,
          fisher_examples: Annotated[int, typer.Option(help="patches, fisher: training examples per Fisher estimate")] = 32,
          shard_size: Annotated[str, typer.Option(help="checkpoints: max bytes per safetensors shard")] = "2GB",
          seed: Annotated[int, typer.Option(help="seed for DARE's random drops")] = 0,
          force: Annotated[bool, typer.Option("--force", help="overwrite OUT; merge patches of different bases")] = False,
          json_out: Annotated[bool, typer.Option("--json", help="print a JSON report")] = False) -> None:
    """Merge fine-tuned checkpoints (streamed, tensor by tensor) or patches (exactly, through dW).

    A mergekit config runs unchanged: `patchlm merge ties.yml --out merged/`. The same with options:
    `patchlm merge --base smollm2-135m -m ft-a -m ft-b --method ties -w 0.5 -w 0.5 -d 0.5 --out merged/`.
    Patches: `patchlm merge -p runs/rt/patch -p runs/trec/patch --method ties -d 0.5 --rank 16 --out runs/merged`.
    """
    from patchlm.merge.plan import load_plan, parse_param, plan_from_options
    from patchlm.paths import check_output

    check_output(out, force)
    given = {"--model": model, "--patch": patch, "--base": base, "--method": method, "--weight": weight,
             "--density": density, "--gamma": gamma, "--param": param, "--dtype": dtype, "--out-dtype": out_dtype,
             "--tokenizer-source": tokenizer_source}
    if config is not None:
        clash = [k for k, v in given.items() if v]
        if clash:
            raise ConfigError(f"give either a config file or merge options, not both (got {config} and {clash[0]})")
        plan = load_plan(config)
        if seed:
            plan.seed = seed
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
                                 params=params, dtype=dtype, out_dtype=out_dtype, tokenizer_source=tokenizer_source,
                                 seed=seed)
    if plan.patches:
        from patchlm.merge.patches import merge_patch_plan

        result = merge_patch_plan(plan, rank=rank, stack=stack, fisher_examples=fisher_examples, force=force,
                                  log=status)
        result.save(out, force=force)
        report = {"out": str(out), "kind": result.kind, "merge_method": plan.merge_method,
                  "patches": [e.model for e in plan.models], "trainable_params": result.trainable_params,
                  **{k: v for k, v in result.metrics.items()}}
    else:
        if rank is not None:
            raise ConfigError("--rank re-factorizes patch merges; checkpoint merges write full weights")
        from patchlm.merge.stream import merge_checkpoints

        report = merge_checkpoints(plan, out, force=force, shard_bytes=_size(shard_size), progress=not json_out)
    if json_out:
        print_json(report)
    else:
        status(f"wrote {out}")
        print_table([report], [k for k in ("merge_method", "kind", "tensors", "shards", "refactor_rel_error",
                                           "seconds") if k in report], "merge")


def glue(patch: Annotated[list[Path], typer.Option("--patch", "-p", help="zoo member: patch dir (repeat)")],
         task: Annotated[list[str], typer.Option("--task", "-t", help="validation task(s) for scoring (repeat)")],
         out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the best selection's merged patch here")] = None,
         heuristic: Annotated[Optional[list[str]], typer.Option("--heuristic", help="average | coefficient | similarity | cmaes (repeat; default all)")] = None,
         threshold: Annotated[float, typer.Option(help="similarity above which models form one family")] = 0.95,
         on: Annotated[str, typer.Option(help="similarity of raw weights (weights) or of task vectors (delta)")] = "weights",
         limit: Annotated[int, typer.Option(help="validation examples per task per score")] = 50,
         trials: Annotated[int, typer.Option(help="CMA-ES evaluations")] = 200,
         max_length: Annotated[int, typer.Option(help="max tokens per example")] = 256,
         bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast")] = False,
         seed: Annotated[int, typer.Option(help="CMA-ES seed")] = 0,
         force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
         json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """Model-GLUE: cluster a zoo of patches, select what to merge on validation data, report why.

    Example: `patchlm glue -p runs/rt/patch -p runs/trec/patch -p runs/bad/patch -t rotten_tomatoes -t trec
    --heuristic average --limit 50 --out runs/glue --json`
    """
    from patchlm.cli.common import load_task_opts
    from patchlm.merge.glue import run_glue
    from patchlm.merge.patches import merge_patches
    from patchlm.models import load_base
    from patchlm.patch import Patch
    from patchlm.paths import check_output

    if out is not None:
        check_output(out, force)
    if limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    patches = [Patch.load(p) for p in patch]
    tasks = [load_task_opts(t) for t in task]
    base = load_base(patches[0].base["name"])
    names = [str(p) for p in patch]
    report = run_glue(base, patches, names, tasks, heuristics=heuristic or ("average", "coefficient", "similarity", "cmaes"),
                      threshold=threshold, limit=limit, trials=trials, seed=seed, bf16=bf16, max_length=max_length,
                      on=on, log=status)
    if out is not None and report["best"]:
        best = report["heuristics"][report["best"]]
        idx = [names.index(n) for n in best["weights"]]
        merged = merge_patches([patches[i] for i in idx], "task_arithmetic", weights=list(best["weights"].values()))
        merged.metrics["glue"] = {"heuristic": report["best"], "score": best["score"], "weights": best["weights"]}
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


def port(patch: Annotated[Path, typer.Argument(help="patch dir made on the old base")],
         to: Annotated[str, typer.Option("--to", help="the updated base: checkpoint dir or built-in name")],
         out: Annotated[Path, typer.Option("--out", "-o", help="output patch dir")],
         from_base: Annotated[Optional[str], typer.Option("--from", help="the patch's original base (default: its recorded name)")] = None,
         min_similarity: Annotated[float, typer.Option(help="weight similarity the new base must have to the old")] = 0.9,
         force: Annotated[bool, typer.Option("--force", help="port even when the new base does not look like an update; overwrite OUT")] = False,
         json_out: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False) -> None:
    """PortLLM: re-target a patch to an updated base of the same architecture, without training.

    Example: `patchlm port runs/rt/patch --to runs/smollm2-evolved --out runs/rt-ported --json`
    """
    from patchlm.merge.port import port_patch
    from patchlm.patch import Patch
    from patchlm.paths import check_output

    check_output(out, force)
    p = Patch.load(patch)
    # the new base is inspected by streaming its checkpoint (module shapes, fingerprint), never trained on
    ported, report = port_patch(p, to, old_base=from_base, force=force, min_similarity=min_similarity)
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
