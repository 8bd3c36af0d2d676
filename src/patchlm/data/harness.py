"""Built-in (or local) tasks as lm-evaluation-harness task YAMLs over local JSONL files, for offline runs:
`lm_eval --include_path DIR --tasks patchlm_sms_spam --model patchlm ...`.

Classification tasks become `multiple_choice` tasks whose context is patchlm's prompt (`Task.prompt`) and whose
choices are the verbalizers, joined with no delimiter: the harness then asks for exactly the log-likelihoods
`patchlm eval` compares, on the same splits in the same order (`--limit N` takes the same first N). Text tasks
become `loglikelihood_rolling` tasks (word/byte perplexity, bits per byte). The YAML is written by hand (JSON is
YAML), so exporting needs no lm-eval.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from patchlm.data.task import Task
from patchlm.errors import ConfigError
from patchlm.paths import atomic_dir, strict_json

PREFIX = "patchlm_"
EXPORTABLE = ("classification", "text")


def harness_name(task: Task) -> str:
    """The harness task name: prefixed, so it never shadows one of lm-eval's own tasks (gsm8k, ...)."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in task.name)
    return PREFIX + safe


def _rows(task: Task, split: str) -> list[dict]:
    if task.kind == "classification":
        return [{"prompt": task.prompt(e), "label": int(e["label"]), "text": e["text"]} for e in task.split(split)]
    return [{"text": e["text"]} for e in task.split(split) if e.get("text")]


def task_config(task: Task, files: dict[str, Path]) -> dict:
    """The harness task config for `task` over the split files (absolute paths)."""
    splits = {s: str(p.resolve()) for s, p in files.items()}
    cfg: dict = {"task": harness_name(task), "dataset_path": "json", "dataset_kwargs": {"data_files": splits},
                 "test_split": "test" if "test" in splits else "validation"}
    if "validation" in splits and cfg["test_split"] != "validation":
        cfg["validation_split"] = "validation"
    if "train" in splits:
        cfg["training_split"] = "train"
    if task.kind == "classification":
        cfg.update({"output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_target": "label",
                    "doc_to_choice": list(task.verbalizers), "target_delimiter": "",
                    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    else:
        cfg.update({"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                    "metric_list": [{"metric": m, "aggregation": m, "higher_is_better": False}
                                    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]})
    cfg["metadata"] = {"version": 1.0, "source": f"patchlm data export-harness {task.name}"}
    return cfg


def export_harness(tasks: Sequence[Task], out: str | Path, force: bool = False) -> dict:
    """Write OUT/<harness name>/{train,validation,test}.jsonl and <harness name>.yaml for each task; atomic."""
    if not tasks:
        raise ConfigError("give at least one task to export")
    names = [harness_name(t) for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"two tasks export to the same harness name: {sorted(names)}")
    for t in tasks:
        if t.kind not in EXPORTABLE:
            raise ConfigError(f"task {t.name} is {t.kind}: only classification and text tasks have a harness form "
                              "that matches patchlm eval (use lm-eval's own tasks for generation)")
    out = Path(out)
    written = []
    with atomic_dir(out, force=force) as tmp:
        for t, name in zip(tasks, names):
            (tmp / name).mkdir()
            files, counts = {}, {}
            for split in ("train", "validation", "test"):
                rows = _rows(t, split)
                if not rows:
                    continue
                f = tmp / name / f"{split}.jsonl"
                f.write_text("".join(strict_json(r, str(f)) + "\n" for r in rows), encoding="utf-8")
                files[split] = out / name / f"{split}.jsonl"
                counts[split] = len(rows)
            if "test" not in files and "validation" not in files:
                raise ConfigError(f"task {t.name} has no test or validation examples to export")
            cfg = task_config(t, files)
            (tmp / name / f"{name}.yaml").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            written.append({"task": t.name, "harness_task": name, "kind": t.kind,
                            "splits": counts})
    return {"out": str(out), "tasks": written,
            "run": f"lm_eval --include_path {out} --tasks {','.join(names)} --model patchlm --model_args base=..."}
