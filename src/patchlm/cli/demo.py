"""Command: demo — the main job end to end on the built-in model, with a before/after table."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated

import typer

from patchlm.adapters.lora import LoraConfig
from patchlm.cli.common import status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.cli.train import has_checkpoint
from patchlm.typed import check_fields


@dataclass
class DemoConfig:
    """The demo's run: a few minutes of LoRA on the built-in model (the LoRA itself is LoraConfig's defaults)."""

    model: str = field(default="smollm2-135m", metadata={"help": "base model"})
    task: str = field(default="rotten_tomatoes", metadata={"help": "classification task"})
    steps: int = field(default=120, metadata={"help": "LoRA training steps"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate"})
    limit: int = field(default=400, metadata={"help": "test examples to evaluate"})
    bf16: bool = field(default=True, metadata={"cli": False, "help": "bf16 autocast for speed"})

    def __post_init__(self):
        check_fields(self)


_BF16 = {f.name: f for f in fields(DemoConfig)}["bf16"]


@config_command(Group(DemoConfig), Group(LoraConfig, rename={"r": "rank"}, only=("r",)))
def demo(cv: ConfigValues,
         bf16: Annotated[bool, typer.Option("--bf16/--fp32", help=_BF16.metadata["help"])] = _BF16.default,
         out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
         force: Annotated[bool, typer.Option("--force", help="replace OUT if it exists")] = False) -> None:
    """Evaluate the base, train a LoRA patch for a few minutes, evaluate again, export to PEFT, print a table.

    Example: `patchlm demo --out runs/demo --force` (about 5 minutes on 2 CPU cores)
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from patchlm.adapters.peft_io import export_peft
    from patchlm.data import load_task
    from patchlm.evaluate import evaluate_classification
    from patchlm.models import load_base
    from patchlm.paths import check_output, set_aside
    from patchlm.train import TrainConfig, Trainer

    dc = DemoConfig(**cv.values(DemoConfig), bf16=bf16)
    lora = LoraConfig(**cv.values(LoraConfig))
    model, task, steps, limit, rank = dc.model, dc.task, dc.steps, dc.limit, lora.r
    check_output(out, force)
    t = load_task(task)
    cfg = TrainConfig(steps=steps, lr=dc.lr, bf16=bf16, save_every=max(20, steps // 4))
    status(f"loading {model} ...")
    base = load_base(model)
    status(f"evaluating the base model on {limit} {task} test examples ...")
    t0 = time.perf_counter()
    before = evaluate_classification(base.model, base.tokenizer, t, limit=limit, bf16=bf16)
    before["seconds"] = time.perf_counter() - t0
    status(f"training a rank-{rank} LoRA patch for {steps} steps ...")
    trainer = Trainer(base, "lora", {"r": rank}, t, cfg, out_dir=out, force=force, log=status)
    with set_aside(out, keep_new=has_checkpoint) if force else nullcontext():  # --force loses nothing on failure
        patch = trainer.run()
    t0 = time.perf_counter()
    after = evaluate_classification(base.model, base.tokenizer, t, limit=limit, bf16=bf16)
    after["seconds"] = time.perf_counter() - t0
    peft_dir = out / "peft"
    export_peft(patch, peft_dir, force=True)
    # check the export: PEFT on a fresh base must give our logits
    from peft import PeftModel

    ids = base.tokenizer(t.prompt(t.test[0]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = base.model(ids).logits
        theirs = PeftModel.from_pretrained(load_base(model).model, str(peft_dir))(ids).logits
    diff = (ours - theirs).abs().max().item()

    table = Table(title=f"patchlm demo: {model} on {task} ({before['n']} test examples)")
    for c in ("model", "accuracy", "macro-F1", "eval time"):
        table.add_column(c)
    table.add_row("base", f"{before['accuracy']:.3f}", f"{before['macro_f1']:.3f}", f"{before['seconds']:.1f} s")
    table.add_row(f"base + LoRA r={rank}", f"{after['accuracy']:.3f}", f"{after['macro_f1']:.3f}",
                  f"{after['seconds']:.1f} s")
    Console().print(table)
    m = patch.metrics
    typer.echo(f"trainable parameters: {patch.trainable_params:,} "
               f"({100 * patch.trainable_params / sum(p.numel() for p in base.model.parameters()):.2f}% of the base)")
    typer.echo(f"training: {m['steps']} steps in {m['train_seconds']:.0f} s, {m['train_tokens_per_s']:.0f} tokens/s")
    typer.echo(f"accuracy gain: {100 * (after['accuracy'] - before['accuracy']):+.1f} points")
    typer.echo(f"patch: {out / 'patch'}   PEFT export: {peft_dir} (max logit difference under PEFT {diff:.1e})")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
