"""Where Newton steps are practical: a classifier head, or a small MLP, on frozen sentence embeddings of a built-in
classification task (minilm-l6, mean-pooled and L2-normalised as all-MiniLM-L6-v2 is used), trained through the
engine's loop with any step rule. Embeddings are computed once per (task, sizes) and cached as safetensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchlm.data import load_task
from patchlm.errors import ConfigError
from patchlm.paths import home
from patchlm.train.engine import StepInfo, train_loop
from patchlm.train.optim import StepRule, make_optimizer

ENCODER = "minilm-l6"


@dataclass
class EmbeddedTask:
    """A classification task as embeddings: x [n, dim] float32, y [n] int64, per split."""

    name: str
    labels: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def embed_texts(texts: list[str], batch_size: int = 64, max_length: int = 128, base=None) -> torch.Tensor:
    """Mean-pooled, L2-normalised minilm-l6 embeddings of texts [n, 384]."""
    from patchlm.models import load_base

    base = base or load_base(ENCODER)
    model, tok = base.model, base.tokenizer
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s: s + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def embedded_task(name: str, n_train: int, n_test: int, seed: int = 0) -> EmbeddedTask:
    """The first n_train train and n_test test examples of built-in classification task `name`, embedded (cached
    under PATCHLM_HOME/qnewton)."""
    from safetensors.torch import load_file, save_file

    from patchlm.models import load_base

    task = load_task(name)
    if task.kind != "classification":
        raise ConfigError(f"task {name} is {task.kind}, not classification: a classifier head needs labels")
    path = home() / "qnewton" / f"{name}-s{seed}-{n_train}-{n_test}.safetensors"
    if path.exists():
        t = load_file(str(path))
    else:
        train, test = task.split("train")[:n_train], task.split("test")[:n_test]
        enc = load_base(ENCODER)
        t = {"x_train": embed_texts([ex["text"] for ex in train], base=enc),
             "y_train": torch.tensor([ex["label"] for ex in train]),
             "x_test": embed_texts([ex["text"] for ex in test], base=enc),
             "y_test": torch.tensor([ex["label"] for ex in test])}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(t, str(tmp))
        tmp.replace(path)
    return EmbeddedTask(name, list(task.labels), t["x_train"].float(), t["y_train"].long(), t["x_test"].float(),
                        t["y_test"].long())


def make_head(kind: str, dim: int, classes: int, hidden: int = 16, seed: int = 0) -> torch.nn.Module:
    """A linear classifier head ('linear') or a one-hidden-layer tanh MLP ('mlp'), seeded."""
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Sequential(torch.nn.Linear(dim, classes))
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
    raise ConfigError(f"unknown head {kind!r}; choices: linear, mlp")


def head_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of the head on a batch {x, y} (the engine's loss_fn contract)."""
    return F.cross_entropy(model(batch["x"]), batch["y"]), int(batch["y"].numel())


def head_count(batch) -> int:
    return int(batch["y"].numel())


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_head(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config, *, batch_size: int | None = None,
               on_step: Callable[[StepRule, StepInfo], None] | None = None) -> StepRule:
    """Train `model` on (x, y) for config.steps steps of config.optimizer (full batch unless batch_size, the order
    a function of config.seed) through the engine's loop; on_step(rule, info) after each step. Returns the rule."""
    params = [p for p in model.parameters() if p.requires_grad]
    rule = make_optimizer(config.optimizer, params, config, model=model)
    n = len(y)
    bs = min(n, batch_size or n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))

    def batches(step: int):
        if bs == n:
            return [{"x": x, "y": y}]
        idx = perm[(torch.arange(bs) + step * bs) % n]
        return [{"x": x[idx], "y": y[idx]}]

    train_loop(model, rule, batches, config.steps, loss_fn=head_loss, count=head_count,
               on_step=(lambda info: on_step(rule, info)) if on_step else None)
    return rule
