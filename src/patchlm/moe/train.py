"""Router-only training of an upcycled MoE on the specialists' mixed training data, through the engine's loop.

Every weight is frozen but the routers (`mlp.gate.weight` of each layer, or any parameters the caller names);
the batches interleave the tasks' training examples round-robin and are a pure function of the step and the seed.
The trained model is saved as a checkpoint (save_upcycled) like the untrained one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from patchlm.errors import ConfigError
from patchlm.moe.config import MoeConfig


def router_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The Mixtral routers' weights (one [E, h] matrix per layer)."""
    return [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]


def mixed_features(tokenizer, task_names: Sequence[str], max_length: int, per_task: int) -> list[dict]:
    """Training features of each task (its own objective), interleaved round-robin, `per_task` of each at most."""
    from patchlm.data import load_task
    from patchlm.data.features import build_features, objective_for

    lists = []
    for name in task_names:
        t = load_task(name)
        lists.append(build_features(t, "train", tokenizer, objective_for(t), max_length, limit=per_task))
    out = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def train_routers(model: torch.nn.Module, tokenizer, task_names: Sequence[str], config: MoeConfig | None = None,
                  params: list[torch.nn.Parameter] | None = None, progress: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """Train only `params` (default: the routers) for config.router_steps steps; returns the loss curve."""
    from patchlm.data.features import collate, pad_id
    from patchlm.train import TrainConfig
    from patchlm.train.engine import train_loop, unit_count
    from patchlm.train.optim import make_optimizer

    cfg = config or MoeConfig()
    tasks = [t for t in task_names if t]
    if not tasks:
        raise ConfigError("router training needs the specialists' tasks (patches record theirs; give --task for "
                          "checkpoints)", field="router_steps")
    params = params if params is not None else router_parameters(model)
    if not params:
        raise ConfigError("the model has no router parameters to train")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    per_task = cfg.batch_size * cfg.router_steps
    feats = mixed_features(tokenizer, tasks, cfg.max_length, per_task)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(feats), generator=gen).tolist()
    pad = pad_id(tokenizer)

    def batches(step: int):
        idx = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        return [collate([feats[i] for i in idx], pad)]

    tcfg = TrainConfig(steps=cfg.router_steps, lr=cfg.router_lr, batch_size=cfg.batch_size,
                       max_length=cfg.max_length, seed=cfg.seed, progress=progress)
    rule = make_optimizer("adamw", params, tcfg, model)
    losses: list[float] = []
    torch.manual_seed(cfg.seed)  # router jitter draws from the global generator
    try:
        train_loop(model, rule, batches, cfg.router_steps, bf16=cfg.bf16, count=unit_count, progress=progress,
                   desc="routers", on_step=lambda info: losses.append(info.loss))
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    if log:
        log(f"routers trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no router steps")
    return {"router_steps": cfg.router_steps, "router_lr": cfg.router_lr, "tasks": tasks,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "examples": len(feats)}
