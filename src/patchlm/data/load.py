"""load_task: one entry point that resolves a built-in name, a local file or a hub dataset id."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from patchlm.data.builtin import TASKS, get_builtin
from patchlm.data.config import DataConfig
from patchlm.data.local import SUFFIXES, load_hub, load_local, looks_like_hub_id, looks_like_path
from patchlm.data.task import DEFAULT_RATIOS, Task
from patchlm.errors import DataError, UnknownNameError, did_you_mean


def load_task(name_or_path: str | Path, *, seed: int = 0, text_column: str | None = None,
              label_column: str | None = None, split_ratios: Sequence[float] = DEFAULT_RATIOS,
              max_examples: int | None = None, checks: DataConfig | None = None) -> Task:
    """A Task from a built-in name, a local csv/tsv/json/jsonl/parquet file, or a hub dataset id.

    checks: the sanity checks on user data (DataConfig: label checks, warnings); built-in tasks are known good."""
    raw = str(name_or_path).strip()
    if not raw:
        raise UnknownNameError(f"empty task name; choices: {', '.join(sorted(TASKS))}")
    builtin_key = raw.lower().replace("-", "_")
    if builtin_key in TASKS and not Path(raw).is_file():
        if text_column is not None or label_column is not None:
            raise DataError(f"text_column/label_column apply to local files and hub datasets, "
                            f"not to the built-in task {builtin_key!r}")
        return get_builtin(builtin_key).load(seed=seed, split_ratios=split_ratios, max_examples=max_examples)
    path = Path(raw).expanduser()
    if path.is_file():
        return load_local(path, seed=seed, text_column=text_column, label_column=label_column,
                          split_ratios=split_ratios, max_examples=max_examples, checks=checks)
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass one {'/'.join(SUFFIXES)} file")
    if looks_like_path(raw):
        raise DataError(f"no such file: {path}")
    if looks_like_hub_id(raw):
        return load_hub(raw, builtin_names=list(TASKS), seed=seed, text_column=text_column,
                        label_column=label_column, split_ratios=split_ratios, max_examples=max_examples,
                        checks=checks)
    raise UnknownNameError(f"unknown task {raw!r}; {did_you_mean(raw, TASKS)}; "
                           f"or pass a local {'/'.join(SUFFIXES)} file or a hub id owner/name")
