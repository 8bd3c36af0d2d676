"""Command: `patchlm report PATH... --out FILE.html`: one self-contained HTML page with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, status


def report(paths: Annotated[list[Path], typer.Argument(
               help="run dirs (metrics.jsonl), federated runs (log.jsonl), patch dirs, a benchmark dir "
                    "(docs/benchmarks/) or JSON reports (a study, `patchlm merge glue --json`)")],
           out: Annotated[Path, typer.Option("--out", "-o", help="the HTML page to write (.html)")],
           title: Annotated[str | None, typer.Option(help="page title (default: the inputs' names)")] = None,
           force: Annotated[bool, typer.Option("--force", help="overwrite OUT")] = False,
           json_out: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False) -> None:
    """Write one HTML page (inline SVG plots, no network) for runs, patches, federated runs and benchmarks;
    several training runs are also compared side by side.

    Example: `patchlm report runs/demo --out runs/demo/report.html`; `patchlm report docs/benchmarks/ --out
    docs/benchmarks/report.html --force`
    """
    from patchlm.report import write_report  # matplotlib: loaded only when the command runs

    path = write_report(paths, out, force=force, title=title)
    if json_out:
        print_json({"out": str(path), "bytes": path.stat().st_size, "inputs": [str(p) for p in paths]})
    else:
        status(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
