"""Helpers shared by the command modules: JSON/table output and loading bases, tasks and patches."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    Console().print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def status(msg: str) -> None:
    err_console.print(f"[dim]{msg}[/dim]")


def load_task_opts(task: str, seed: int = 0, text_column: str | None = None, label_column: str | None = None,
                   max_examples: int | None = None):
    from patchlm.data import load_task

    return load_task(task, seed=seed, text_column=text_column, label_column=label_column, max_examples=max_examples)
