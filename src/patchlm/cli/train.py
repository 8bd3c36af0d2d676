"""Command: train a patch (LoRA; other adapter methods add their options here)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from patchlm.cli.common import load_task_opts, print_json, status
from patchlm.errors import ConfigError, UnknownNameError, did_you_mean


def _lora_spec(o: dict, recipe: dict) -> dict:
    """LoRA spec: defaults < the recipe's `spec` < flags given on the command line."""
    given = {"r": o["rank"], "alpha": o["alpha"], "dropout": o["dropout"], "targets": o["targets"]}
    spec = {"r": 8, "dropout": 0.0, "targets": "all-linear", **recipe, **{k: v for k, v in given.items() if v is not None}}
    if int(spec["r"]) <= 0:
        raise ConfigError(f"--rank must be positive, got {spec['r']}")
    spec.setdefault("alpha", 2 * int(spec["r"]))
    if o["alpha"] is None and "alpha" not in recipe:
        spec["alpha"] = 2 * int(spec["r"])
    return spec


def _mos_spec(o: dict, recipe: dict) -> dict:
    """MoS spec: defaults < the recipe's `spec` < flags. alpha defaults to 2 x r (the MoS rank)."""
    from patchlm.adapters.mos import DEFAULTS, mos_config

    if o.get("rank") is not None:
        raise ConfigError("--rank is LoRA's; MoS takes --mos-r (its rank) and --mos-e (the equivalent LoRA rank)")
    given = {"r": o.get("mos_r"), "e": o.get("mos_e"), "p": o.get("mos_p"), "l": o.get("mos_l"),
             "alpha": o.get("alpha"), "dropout": o.get("dropout"), "targets": o.get("targets"),
             "subset_selection": o.get("subset_selection"), "pair_dissociation": o.get("pair_dissociation"),
             "vector_sharding": o.get("vector_sharding"), "privatization": o.get("privatization")}
    spec = {**DEFAULTS, **recipe, **{k: v for k, v in given.items() if v is not None}}
    if spec.get("alpha") is None:
        spec["alpha"] = 2 * int(spec["r"])
    mos_config(spec)  # bad values fail here, before the model loads
    return spec


# method name -> (patch kind, function(CLI options, recipe spec) -> the kind's spec)
METHODS: dict[str, tuple[str, Callable[[dict], dict]]] = {"lora": ("lora", _lora_spec), "mos": ("mos", _mos_spec)}


def _load_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    d = yaml.safe_load(path.read_text()) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    allowed = {"model", "task", "method", "spec", "train", "seed"}
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"recipe {path} has unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    return d


def train(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")] = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="built-in task or a local data file")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run directory; the patch goes to OUT/patch")] = None,
    method: Annotated[Optional[str], typer.Option(help="adapter method: lora | mos (Mixture of Shards) [lora]")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank [8]")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="adapter alpha, scaling = alpha / rank (LoRA --rank, MoS --mos-r) [2 x rank]")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="adapter dropout [0]")] = None,
    mos_r: Annotated[Optional[int], typer.Option("--mos-r", help="MoS: rank of each module's A/B [16]")] = None,
    mos_e: Annotated[Optional[int], typer.Option("--mos-e", help="MoS: equivalent LoRA rank, the parameter budget [2]")] = None,
    mos_p: Annotated[Optional[int], typer.Option("--mos-p", help="MoS: private rank per layer [1]")] = None,
    mos_l: Annotated[Optional[int], typer.Option("--mos-l", help="MoS: shards per vector [4]")] = None,
    subset_selection: Annotated[Optional[bool], typer.Option(
        "--subset-selection/--no-subset-selection",
        help="MoS: each layer picks its own subset of public shards (off: all layers use the same ones) [on]")] = None,
    pair_dissociation: Annotated[Optional[bool], typer.Option(
        "--pair-dissociation/--no-pair-dissociation",
        help="MoS: A and B draw their shard indices independently (off: B uses A's indices) [on]")] = None,
    vector_sharding: Annotated[Optional[bool], typer.Option(
        "--vector-sharding/--no-vector-sharding",
        help="MoS: each rank vector is l concatenated shards (off: l=1, whole vectors) [on]")] = None,
    privatization: Annotated[Optional[bool], typer.Option(
        "--privatization/--no-privatization",
        help="MoS: each layer owns p private rank vectors (off: p=0, all shards public). All four off = pure sharing [on]")] = None,
    targets: Annotated[Optional[str], typer.Option(help="modules: names (q_proj,v_proj) or a preset: attn, mlp, qv, all-linear [all-linear]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps [200]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per micro-batch [8]")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="micro-batches per step [1]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate [2e-4]")] = None,
    warmup: Annotated[Optional[float], typer.Option(help="warm-up fraction (<1) or steps [0.06]")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine | linear | constant [cosine]")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="max tokens per example [256]")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="validate every N steps; 0 = at the end [0]")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(help="validation examples per evaluation [200]")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="checkpoint every N steps [50]")] = None,
    objective: Annotated[Optional[str], typer.Option(help="auto | classification | lm | chat [auto]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed for init, data order, dropout and split [0]")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast (about 2x faster on AVX-512 BF16 CPUs)")] = None,
    max_examples: Annotated[Optional[int], typer.Option(help="cap each data split (for quick runs)")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="text column of a local data file")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="label column of a local data file")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (model, task, method, spec, train); flags override it")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in OUT from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT and start over")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the patch info as JSON")] = False,
) -> None:
    """Train a patch on a task and write it to OUT/patch (checkpoints and metrics.jsonl beside it).

    Example: `patchlm train --model tiny-random-llama --task sms_spam --method lora --rank 4 --steps 20 --out runs/t`

    MoS: `patchlm train -m tiny-random-llama -t sms_spam --method mos --mos-r 4 --mos-e 2 --mos-p 1 --mos-l 2 --steps 20 --out runs/m`
    (add --no-subset-selection, --no-pair-dissociation, --no-vector-sharding, --no-privatization for ablations).
    """
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    recipe = _load_recipe(config)
    model = model or recipe.get("model")
    task = task or recipe.get("task")
    method = method or recipe.get("method", "lora")
    if not model or not task or out is None:
        raise ConfigError("train needs --model, --task and --out (or model/task in --config)")
    if method not in METHODS:
        raise UnknownNameError(f"unknown method {method!r}; {did_you_mean(method, METHODS)}")
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: pick one")
    cli_train = {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr, "warmup": warmup,
                 "schedule": schedule, "max_length": max_length, "eval_every": eval_every, "eval_limit": eval_limit,
                 "save_every": save_every, "objective": objective, "seed": seed, "bf16": bf16}
    train_opts: dict[str, Any] = dict(recipe.get("train", {}))
    if "seed" in recipe:
        train_opts.setdefault("seed", recipe["seed"])
    train_opts.update({k: v for k, v in cli_train.items() if v is not None})
    train_opts["progress"] = not quiet
    cfg = TrainConfig.from_dict(train_opts)
    kind, build = METHODS[method]
    opts = dict(locals())
    spec = build(opts, dict(recipe.get("spec") or {}))
    t = load_task_opts(task, seed=cfg.seed, text_column=text_column, label_column=label_column,
                       max_examples=max_examples)
    base = load_base(model)
    trainer = Trainer(base, kind, spec, t, cfg, out_dir=out, resume=resume, force=force, log=status)
    patch = trainer.run()
    info = patch.info()
    if json_out:
        print_json(info)
    else:
        m = patch.metrics
        status(f"wrote {out / 'patch'}: {info['trainable_params']:,} trainable params, "
               f"{m.get('train_tokens_per_s', 0):.0f} tokens/s"
               + (f", val accuracy {m['val_accuracy']:.3f}" if "val_accuracy" in m else "")
               + (f", val loss {m['val_loss']:.3f}" if "val_loss" in m else ""))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
