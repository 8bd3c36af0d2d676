"""Helpers shared by the command modules: JSON/table output and loading bases, tasks and patches."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    from patchlm.paths import strict_json

    sys.stdout.write(strict_json(obj, "the JSON report", indent=2, default=str) + "\n")


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
                   max_examples: int | None = None, checks=None):
    """load_task with the CLI's options; checks: a DataConfig (the data sanity checks), default its defaults."""
    from patchlm.data import load_task

    return load_task(task, seed=seed, text_column=text_column, label_column=label_column, max_examples=max_examples,
                     checks=checks)


def load_patches(paths) -> list:
    """Read patch directories (before any model loads, so a bad one fails fast) and refuse stacks that cannot
    work: drop patches that together remove every attention layer."""
    from patchlm.depth.drop import effective
    from patchlm.errors import ConfigError
    from patchlm.patch import Patch

    paths = list(paths or [])
    patches = [Patch.load(p) for p in paths]
    drops = [(str(path), p) for path, p in zip(paths, patches) if p.kind == "drop"]
    if len(drops) > 1:
        try:
            sizes = {int(p.spec["num_layers"]) for _, p in drops}
            attention = set().union(*(effective(p.spec)[0] for _, p in drops))
        except (KeyError, TypeError, ValueError):
            return patches  # a malformed drop spec: its own attach names the problem
        n = sizes.pop() if len(sizes) == 1 else 0
        if n and set(range(n)) <= attention:
            raise ConfigError(f"drop patches {', '.join(name for name, _ in drops)} together remove all {n} "
                              "attention layers; at least one must remain: stack fewer of them")
    return patches
