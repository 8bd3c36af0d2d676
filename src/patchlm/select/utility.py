"""SHED's utilities: the score of a model trained on a set of proxies, measured on validation data.

- `lora`: the real one: a short LoRA training of the base model on the proxies through the engine (the patch
  Trainer on train_loop), scored by validation accuracy (classification) or minus the validation loss (chat,
  text); the empty set is the base model itself, measured (not taken as 0).
- `probe`: the cheap one: a logistic-regression probe on the proxies' embeddings, scored by validation accuracy;
  the empty set is chance (1 / number of labels).
- `coverage`: for data without labels: the mean, over validation examples, of the cosine similarity to the
  nearest proxy; the empty set covers nothing (0).
Each is a callable `utility(proxy positions) -> float` plus `empty() -> float`.
"""

from __future__ import annotations

import math
import time

import numpy as np

from patchlm.data.task import Task
from patchlm.errors import ConfigError, DataError
from patchlm.patch import get_kind
from patchlm.select.config import SelectConfig
from patchlm.train.config import TrainConfig
from patchlm.train.trainer import Trainer


class ProbeUtility:
    """Validation accuracy of a logistic regression fitted on the proxies' embeddings and labels."""

    def __init__(self, proxy_emb: np.ndarray, proxy_labels: np.ndarray, val_emb: np.ndarray, val_labels: np.ndarray,
                 num_labels: int, seed: int = 0):
        self.x, self.y = proxy_emb, proxy_labels
        self.vx, self.vy = val_emb, val_labels
        self.num_labels, self.seed = num_labels, seed

    def __call__(self, subset: list[int]) -> float:
        if not subset:
            return self.empty()
        y = self.y[subset]
        classes = np.unique(y)
        if len(classes) == 1:  # one label seen: the probe can only predict it
            return float((self.vy == classes[0]).mean())
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000, random_state=self.seed).fit(self.x[subset], y)
        return float((clf.predict(self.vx) == self.vy).mean())

    def empty(self) -> float:
        return 1.0 / self.num_labels


class CoverageUtility:
    """Mean cosine similarity of each validation example to its nearest proxy (embeddings are unit vectors)."""

    def __init__(self, proxy_emb: np.ndarray, val_emb: np.ndarray):
        self.sim = val_emb @ proxy_emb.T  # [V, C]

    def __call__(self, subset: list[int]) -> float:
        if not subset:
            return self.empty()
        return float(self.sim[:, subset].max(1).mean())

    def empty(self) -> float:
        return 0.0


class LoraUtility:
    """Validation score of a short LoRA training of the base model on the proxies (through the patch Trainer).

    Every call starts from the clean base (the LoRA is detached afterwards), with the same seed, so the utility is
    a deterministic function of the set."""

    def __init__(self, base, task: Task, proxies: list[dict], validation: list[dict], cfg: SelectConfig):
        if not validation:
            raise DataError(f"task {task.name} has an empty validation split: the lora utility scores on it")
        self.base, self.task, self.proxies, self.cfg = base, task, proxies, cfg
        self.validation = validation[: cfg.val_limit]
        self.kind = get_kind("lora")
        self.seconds = 0.0

    def _task(self, examples: list[dict]) -> Task:
        t = self.task
        return Task(name=f"{t.name}-proxies", kind=t.kind, train=examples, validation=self.validation, test=[],
                    labels=list(t.labels), verbalizers=list(t.verbalizers), template=t.template, seed=t.seed,
                    max_chars=t.max_chars)

    def _config(self, n: int) -> TrainConfig:
        c = self.cfg
        steps = max(1, math.ceil(c.lora_epochs * n / c.batch_size))
        return TrainConfig(steps=steps, batch_size=c.batch_size, lr=c.lora_lr, max_length=c.max_length, bf16=c.bf16,
                           eval_limit=c.val_limit, seed=c.seed, progress=False)

    @staticmethod
    def _score(metrics: dict) -> float:
        if "val_accuracy" in metrics:
            return float(metrics["val_accuracy"])
        if "val_loss" in metrics:
            return -float(metrics["val_loss"])
        raise ConfigError("the lora utility got no validation score (is the validation split empty?)")

    def __call__(self, subset: list[int]) -> float:
        if not subset:
            return self.empty()
        t0 = time.perf_counter()
        examples = [self.proxies[i] for i in subset]
        trainer = Trainer(self.base, "lora", {"r": self.cfg.lora_rank}, self._task(examples),
                          self._config(len(examples)))
        try:
            patch = trainer.run()
        finally:
            self.kind.detach(self.base.model)
            self.base.model.eval()
        self.seconds += time.perf_counter() - t0
        return self._score(patch.metrics)

    def empty(self) -> float:
        """The base model's own validation score (no training)."""
        trainer = Trainer(self.base, "lora", {"r": self.cfg.lora_rank}, self._task(self.proxies),
                          self._config(len(self.proxies)))
        return self._score(trainer.validate())


def make_utility(name: str, *, task: Task, cfg: SelectConfig, proxy_idx: list[int], pool_emb: np.ndarray,
                 val_emb: np.ndarray, base=None):
    """The utility `name` over the proxies `proxy_idx` (positions in task.train)."""
    val = task.validation[: cfg.val_limit]
    if name == "probe":
        if task.kind != "classification":
            raise ConfigError(f"the probe utility needs labels; task {task.name} is {task.kind}: use utility lora "
                              "or coverage", field="utility")
        labels = np.array([int(task.train[i]["label"]) for i in proxy_idx])
        return ProbeUtility(pool_emb[proxy_idx], labels, val_emb, np.array([int(e["label"]) for e in val]),
                            len(task.labels), cfg.seed)
    if name == "coverage":
        return CoverageUtility(pool_emb[proxy_idx], val_emb)
    if name == "lora":
        if base is None:
            raise ConfigError("the lora utility needs a base model", field="model")
        return LoraUtility(base, task, [task.train[i] for i in proxy_idx], val, cfg)
    raise ConfigError(f"unknown utility {name!r}", field="utility")
