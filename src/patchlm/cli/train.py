"""Command: train a patch (LoRA, MoS, VeRA, VB-LoRA). Options are generated from the method configs and TrainConfig.

Values layer as: the config dataclasses' defaults < the YAML recipe (`spec` = the method config's fields,
`train` = TrainConfig's fields) < the flags typed on the command line. --alpha, --dropout and --targets are
LoraConfig's fields and set the same-named field of every method that has one.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from patchlm.adapters import (
    METHOD_CONFIGS,
    LoraConfig,
    MosConfig,
    PrefixConfig,
    PromptConfig,
    VBLoraConfig,
    VeraConfig,
)
from patchlm.adapters.config import check_spec_keys, from_spec
from patchlm.adapters.mos import STRATEGIES, mos_config
from patchlm.cli.common import load_task_opts, print_json, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.data.config import DataConfig
from patchlm.errors import ConfigError, DataError, UnknownNameError, did_you_mean
from patchlm.paths import check_writable, set_aside
from patchlm.train.config import TrainConfig

SHARED = ("alpha", "dropout", "targets")  # LoraConfig's flags that every method with such a field takes
RECIPE_KEYS = ("model", "task", "method", "spec", "train", "seed")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def method_spec(method: str, cv: ConfigValues, recipe_spec: dict) -> dict:
    """The spec of `method`: the recipe's spec < the flags typed (other methods' flags are refused)."""
    cls = METHOD_CONFIGS[method]
    check_spec_keys(cls, recipe_spec, method)
    typed = {}
    for other in METHOD_CONFIGS.values():
        for name, value in cv.given(other).items():
            if other is cls or (other is LoraConfig and name in SHARED and name in _field_names(cls)):
                typed[name] = value
            else:
                owner = next(m for m, c in METHOD_CONFIGS.items() if c is other)
                raise ConfigError(f"{cv.flag(other, name)} is an option of --method {owner}, not of {method}"
                                  + ("; MoS takes --mos-r (its rank) and --mos-e (the equivalent LoRA rank)"
                                     if method == "mos" and other is LoraConfig and name == "r" else ""))
    spec = {**recipe_spec, **typed}
    from_spec(cls, spec, method)  # bad values fail here, before the model loads
    if method == "mos":
        mos_config(spec, strict=True)
    return spec


def _flag(cv: ConfigValues, method: str, field: str) -> str | None:
    """The option that sets config field `field` for this method."""
    cls = METHOD_CONFIGS.get(method)
    for c in ([cls] if cls else []) + [LoraConfig, TrainConfig]:
        if c is LoraConfig and cls is not LoraConfig and field not in SHARED:
            continue
        flag = cv.flag(c, field)
        if flag:
            return flag
    return None


def has_checkpoint(run: Path) -> bool:
    """Whether a run directory holds a resumable checkpoint (then a --force'd old run need not come back)."""
    return (run / "checkpoints" / "last" / "state.json").exists()


def _load_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    unknown = set(d) - set(RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"recipe {path} has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"allowed: {', '.join(RECIPE_KEYS)}")
    for key in ("model", "task", "method"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"recipe {path}: {key} must be a name, got {d[key]!r}")
    for key in ("spec", "train"):
        if not isinstance(d.get(key) or {}, dict):
            raise ConfigError(f"recipe {path}: {key} must be a mapping of {key} fields")
        bad = [k for k in d.get(key) or {} if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"recipe {path}: {key} key {bad[0]!r} is not a field name")
    return d


@config_command(
    Group(TrainConfig, exclude=("progress", "bf16"), panel="Training (TrainConfig)"),
    Group(LoraConfig, rename={"r": "rank"}, panel="LoRA (--alpha, --dropout, --targets: every method)"),
    Group(MosConfig, prefix="mos-", only=("r", "e", "p", "l"), panel="MoS (--method mos)"),
    Group(MosConfig, only=STRATEGIES, panel="MoS (--method mos)"),
    Group(VeraConfig, prefix="vera-", exclude=SHARED, panel="VeRA (--method vera)"),
    Group(VBLoraConfig, prefix="vblora-", exclude=SHARED, panel="VB-LoRA (--method vblora)"),
    Group(PrefixConfig, prefix="prefix-", panel="Prefix tuning (--method prefix)"),
    Group(PromptConfig, prefix="prompt-", panel="Prompt tuning (--method prompt)"),
    Group(DataConfig, panel="Data checks (DataConfig)"),
)
def train(
    cv: ConfigValues,
    model: Annotated[str | None, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="built-in task or a local data file")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory; the patch goes to OUT/patch")] = None,
    method: Annotated[str | None, typer.Option(
        help=f"adapter method: {' | '.join(METHOD_CONFIGS)}; unset: the recipe's, else lora")] = None,
    bf16: Annotated[bool | None, typer.Option(
        "--bf16/--fp32", help="bf16 autocast (about 2x faster on AVX-512 BF16 CPUs); unset: the recipe's, "
                              "else TrainConfig's")] = None,
    max_examples: Annotated[int | None, typer.Option(help="cap each data split (for quick runs)")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column of a local data file")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column of a local data file")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML recipe (model, task, method, spec, train); flags override it")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in OUT from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT and start over")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the patch info as JSON")] = False,
) -> None:
    """Train a patch on a task and write it to OUT/patch (checkpoints and metrics.jsonl beside it).

    Example: `patchlm train --model tiny-random-llama --task sms_spam --method lora --rank 4 --steps 20 --out runs/t`

    MoS: `patchlm train -m tiny-random-llama -t sms_spam --method mos --mos-r 4 --mos-e 2 --mos-p 1 --mos-l 2
    --steps 20 --out runs/m`
    (add --no-subset-selection, --no-pair-dissociation, --no-vector-sharding, --no-privatization for ablations).

    VeRA / VB-LoRA (PEFT-backed): `--method vera --vera-r 64` or `--method vblora --vblora-vector-length 16`.
    Prefix / prompt tuning: `--method prefix --prefix-num-virtual-tokens 5`, `--method prompt`. Full fine-tuning of
    the linear weights: `--method full`. Zeroth order: `--optimizer zo-sgd --lr 1e-4` (see --zo-* options).
    """
    recipe = _load_recipe(config)
    method = method or recipe.get("method") or "lora"
    try:
        _train(cv, recipe, model, task, out, method, bf16, max_examples, text_column, label_column, resume, force,
               quiet, json_out)
    except ConfigError as e:
        flag = _flag(cv, method, e.field) if e.field else None
        msg = str(e) + (f" (option {flag})" if flag and flag not in str(e) else "")
        raise ConfigError(msg) from e


def _train(cv, recipe, model, task, out, method, bf16, max_examples, text_column, label_column, resume, force, quiet,
           json_out) -> None:
    from patchlm.models import load_base
    from patchlm.train import Trainer

    model = model or recipe.get("model")
    task = task or recipe.get("task")
    if not model or not task or out is None:
        raise ConfigError("train needs --model, --task and --out (or model/task in --config)")
    if method not in METHOD_CONFIGS:
        raise UnknownNameError(f"unknown method {method!r}; {did_you_mean(method, METHOD_CONFIGS)}")
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: pick one")
    train_opts: dict[str, Any] = dict(recipe.get("train") or {})
    if "seed" in recipe:
        train_opts.setdefault("seed", recipe["seed"])
    train_opts.update(cv.given(TrainConfig))
    if bf16 is not None:
        train_opts["bf16"] = bf16
    train_opts["progress"] = not quiet
    cfg = TrainConfig.from_dict(train_opts)
    for name in ("save_every", "log_every"):  # the trainer takes step % N: 0 would fail after the first step
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}", field=name)
    check_writable(out)
    spec = method_spec(method, cv, dict(recipe.get("spec") or {}))
    t = load_task_opts(task, seed=cfg.seed, text_column=text_column, label_column=label_column,
                       max_examples=max_examples, checks=DataConfig(**cv.values(DataConfig)))
    if len(t.train) < cfg.batch_size:
        raise DataError(f"task {t.name} has {len(t.train)} training example(s), fewer than one batch "
                        f"(batch_size {cfg.batch_size}): add data, lower batch_size or raise --max-examples")
    base = load_base(model)
    trainer = Trainer(base, method, spec, t, cfg, out_dir=out, resume=resume, force=force, log=status)
    # --force: the old run is set aside, and put back unless the new one got as far as its first checkpoint
    with set_aside(out, keep_new=has_checkpoint) if force else nullcontext():
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
