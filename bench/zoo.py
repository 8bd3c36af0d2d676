"""The zoo of LoRA patches shared by bench/merging.py and bench/port.py, trained once and cached.

Members: one LoRA per task (rotten_tomatoes, trec, bbc_news) on smollm2-135m, plus deliberately harmful
members trained on the same tasks with their training labels shuffled. Each patch lives under
bench/.cache/zoo/<tag>/<member>/patch; an interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, bench_lock

MODEL = "smollm2-135m"
TASKS = ["rotten_tomatoes", "trec", "bbc_news"]
# bbc_news articles are long: 128 tokens (the prompt is cut from the left, the question at the end stays)
MAX_LENGTH = {"bbc_news": 128, "news_corpus": 128}
DEFAULT_MAX_LENGTH = 192
SPEC = {"r": 8, "alpha": 16, "targets": "all-linear"}
GOOD = {t: (t, False) for t in TASKS}
HARMFUL = {"rotten_tomatoes-shuffled": ("rotten_tomatoes", True), "trec-shuffled": ("trec", True)}


def max_length(task_name: str) -> int:
    return MAX_LENGTH.get(task_name, DEFAULT_MAX_LENGTH)


def load(task_name: str, shuffled: bool = False):
    """A built-in task; with shuffled, its training labels are permuted (a harmful zoo member's data)."""
    from patchlm.data import load_task

    t = load_task(task_name)
    if shuffled:
        labels = [e["label"] for e in t.train]
        random.Random(1234).shuffle(labels)
        train = [{**e, "label": lab} for e, lab in zip(t.train, labels)]
        t = dataclasses.replace(t, train=train, name=f"{task_name}-shuffled")
    return t


def config(steps: int, task_name: str, lr: float = 5e-4, seed: int = 0):
    from patchlm.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=8, lr=lr, bf16=True, max_length=max_length(task_name),
                       eval_limit=100, save_every=25, progress=False, seed=seed)


def train_member(name: str, task_name: str, shuffled: bool, steps: int, tag: str, base_ref: str = MODEL,
                 log=print) -> Path:
    """Train (or resume, or reuse) one zoo member; returns its patch directory."""
    import time

    from patchlm.models import load_base
    from patchlm.train import Trainer

    out = CACHE / "zoo" / tag / name
    patch_dir = out / "patch"
    if (patch_dir / "patch.json").exists():
        return patch_dir
    resume = (out / "checkpoints" / "last" / "state.json").exists()
    log(f"zoo: training {name} ({task_name}{', shuffled labels' if shuffled else ''}, {steps} steps on {base_ref})"
        + (" [resume]" if resume else ""))
    t0 = time.perf_counter()
    base = load_base(base_ref)
    Trainer(base, "lora", dict(SPEC), load(task_name, shuffled), config(steps, task_name), out_dir=out,
            resume=resume, force=not resume).run()
    log(f"zoo: {name} done in {time.perf_counter() - t0:.0f} s")
    return patch_dir


def specialist(task_name: str, steps: int, base_ref: str = MODEL, tag: str | None = None, log=print) -> Path:
    """The one LoRA specialist of a task that every study combining task patches uses (merging, port, moe, mcsmoe,
    route): the zoo's recipe (SPEC, config()), trained once under bench/.cache/zoo/<tag>/<task>/patch while holding
    $PATCHLM_BENCH_LOCK. The tag is s<steps> on smollm2-135m (the merging study's members), else <base>-s<steps>."""
    tag = tag or (f"s{steps}" if base_ref == MODEL else f"{base_ref}-s{steps}")
    with bench_lock():
        return train_member(task_name, task_name, False, steps, tag, base_ref=base_ref, log=log)


def upcycled_moe(steps: int, router_steps: int, base_ref: str = MODEL, tag: str | None = None,
                 log=print) -> tuple[Path, dict]:
    """The one upcycled MoE every MoE study uses (bench/mcsmoe.py, bench/quant.py): four experts, the three task
    specialists (specialist(), `steps` steps) and the base itself as a generalist expert (positive prompts of every
    task), a top-2 Mixtral, gate mode hidden, then `router_steps` of router-only training on the mixed tasks; float32.
    Built once under bench/.cache/zoo/<tag>/moe while holding $PATCHLM_BENCH_LOCK; returns (its checkpoint dir,
    what was built: the router training's report and the patches)."""
    import json

    tag = tag or (f"s{steps}" if base_ref == MODEL else f"{base_ref}-s{steps}")
    patches = [specialist(t, steps, base_ref, tag=tag, log=log) for t in TASKS]
    out = CACHE / "zoo" / tag / f"moe-r{router_steps}"
    info_f = out / "build.json"
    with bench_lock():
        if not (info_f.exists() and (out / "config.json").exists()):
            from patchlm.models import load_base
            from patchlm.moe import Expert, MoeConfig, save_upcycled, upcycle
            from patchlm.moe.train import train_routers
            from patchlm.moe.upcycle import task_prompts

            log(f"zoo: upcycling the 4-expert MoE ({router_steps} router steps)")
            cfg = MoeConfig(gate_mode="hidden", top_k=2, dtype="float32", router_steps=router_steps)
            experts = [Expert(str(p), task=t) for p, t in zip(patches, TASKS)]
            base = load_base(base_ref)
            mixed = [q for t in TASKS for q in task_prompts(t, base.tokenizer, 3, cfg.max_length)]
            experts.append(Expert(base_ref, positive_prompts=mixed))  # the generalist: prompts of every task
            up = upcycle(base_ref, experts, cfg, base=base, log=log)
            rep = train_routers(up.model, up.tokenizer, TASKS, cfg, log=log)
            save_upcycled(up, out, force=True)
            info_f.write_text(json.dumps({"moe": str(out), "router_training": rep,
                                          "patches": [str(p) for p in patches]}, indent=1))
    return out, json.loads(info_f.read_text())


def build(steps: int, tag: str, harmful: bool = True, log=print) -> dict[str, Path]:
    """member name -> patch dir, training what is missing."""
    members = {**GOOD, **(HARMFUL if harmful else {})}
    return {n: train_member(n, t, s, steps, tag, log=log) for n, (t, s) in members.items()}


def evaluate_tasks(base, tasks: dict, limit: int, split: str = "test") -> dict[str, float]:
    """Accuracy of base.model (with whatever is attached) on each task's split."""
    from patchlm.evaluate import evaluate_classification

    return {name: evaluate_classification(base.model, base.tokenizer, t, split=split, limit=limit, bf16=True,
                                          max_length=max_length(name), batch_size=16)["accuracy"]
            for name, t in tasks.items()}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    build(10 if a.quick else a.steps, "quick" if a.quick else f"s{a.steps}")
