"""Command: `patchlm select`: choose a training subset (SHED or a baseline) and write it as a JSONL data file.

Its options are generated from `SelectConfig` (patchlm.select.config), so every default lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_task_opts, print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.errors import ConfigError
from patchlm.select.config import SelectConfig


@config_command(Group(SelectConfig, exclude=("progress",), panel="Selection (SelectConfig)"))
def select(
    cv: ConfigValues,
    task: Annotated[str, typer.Option("--task", "-t", help="built-in task or a local data file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the subset file to write (.jsonl)")],
    max_examples: Annotated[int | None, typer.Option(help="cap the task's splits (for quick runs)")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column of a local data file")] = None,
    label_column: Annotated[str | None, typer.Option(help="label column of a local data file")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted SHED selection")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUT / discard an interrupted selection")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Select a subset of a task's training split and write it (one example per line) to OUT, its report (values,
    clusters, timings) to OUT's stem + .report.json. `patchlm train --task OUT` trains on the subset.

    Example: `patchlm select --task sms_spam --method shed --utility probe --clusters 20 --fraction 0.1
    --out runs/spam-shed.jsonl`

    SHED's real utility trains LoRA on the base model per evaluation: `--utility lora --model smollm2-135m`;
    baselines: `--method random | full | perplexity | kcenter | knn-shapley`.
    """
    from patchlm.select.run import run_selection  # torch, sklearn: loaded only when the command runs

    if resume and force:
        raise ConfigError("--resume and --force contradict each other: pick one")
    cfg = SelectConfig(**{**cv.values(SelectConfig), "progress": not quiet})
    t = load_task_opts(task, seed=cfg.seed, text_column=text_column, label_column=label_column,
                       max_examples=max_examples)
    sel, subset, report = run_selection(t, cfg, out, resume=resume, force=force, log=status)
    r = sel.report
    if t.kind == "classification" and len({t.train[i]["label"] for i in sel.indices}) < 2:
        status(f"warning: the subset holds a single label ({t.labels[t.train[sel.indices[0]]['label']]}); "
               "patchlm train refuses a classification file with one label: select more examples")
    if json_out:
        print_json({k: v for k, v in r.items() if k != "rounds"})
        return
    status(f"wrote {len(sel.indices)} of {r['pool']} examples ({cfg.method}) to {subset} in {r['seconds']:.1f} s; "
           f"report: {report}")
    if cfg.method == "shed":
        top = sorted(r["clusters"], key=lambda c: -c["value"])[:10]
        print_table(top, ["cluster", "size", "proxy", "value", "stderr"],
                    f"top clusters by Shapley value (u(all) {r['u_full']:.4g}, u(none) {r['u_empty']:.4g})")


def register(app: typer.Typer) -> None:
    app.command("select")(select)
