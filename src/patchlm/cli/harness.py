"""Command: `patchlm data export-harness TASK... --out DIR` (registered under the `data` group by cli/core.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_task_opts, print_json, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.data.config import DataConfig
from patchlm.evaluate.config import EvalConfig


@config_command(Group(EvalConfig, only=("seed",)), Group(DataConfig, panel="Data checks (DataConfig)"))
def export_harness(cv: ConfigValues,
                   tasks: Annotated[list[str], typer.Argument(help="built-in tasks or local data files")],
                   out: Annotated[Path, typer.Option("--out", "-o", help="directory for the task YAMLs and data")],
                   max_examples: Annotated[int | None, typer.Option(help="cap the task's splits")] = None,
                   force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
                   json_out: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False
                   ) -> None:
    """Export tasks as lm-evaluation-harness task YAMLs over local JSONL files (the same splits, prompts and
    verbalizers as `patchlm eval`), to run offline in the harness.

    Example: `patchlm data export-harness sms_spam trec --out runs/harness` then `lm_eval --include_path
    runs/harness --tasks patchlm_sms_spam --model patchlm --model_args base=tiny-random-llama --limit 20`
    """
    from patchlm.data.harness import export_harness as export

    seed = cv.values(EvalConfig)["seed"]
    checks = DataConfig(**cv.values(DataConfig))
    loaded = [load_task_opts(t, seed=seed, max_examples=max_examples, checks=checks) for t in tasks]
    res = export(loaded, out, force=force)
    if json_out:
        print_json(res)
    else:
        for t in res["tasks"]:
            status(f"{t['task']} -> {t['harness_task']} ({', '.join(f'{s} {n}' for s, n in t['splits'].items())})")
        status(f"wrote {out}; run: {res['run']}")
