"""Datasets for patch training and evaluation: built-ins shipped in pip packages, local files, hub ids."""

from patchlm.data.builtin import TASKS, BuiltinTask, list_tasks, parse_truncated_json_array, register
from patchlm.data.cache import cache_path, patchlm_home
from patchlm.data.config import DataConfig, DataWarning
from patchlm.data.load import load_task
from patchlm.data.local import SUFFIXES, load_local
from patchlm.data.task import KINDS, SPLITS, Task, build_task, deduplicate, normalize_text, split_examples

__all__ = [
    "KINDS",
    "SPLITS",
    "SUFFIXES",
    "TASKS",
    "BuiltinTask",
    "DataConfig",
    "DataWarning",
    "Task",
    "build_task",
    "cache_path",
    "deduplicate",
    "list_tasks",
    "load_local",
    "load_task",
    "normalize_text",
    "parse_truncated_json_array",
    "patchlm_home",
    "register",
    "split_examples",
]
