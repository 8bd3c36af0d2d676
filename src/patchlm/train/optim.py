"""Optimizer step rules: how one training step moves the parameters, given a loss closure.

A step rule has `step(closure) -> float`, `set_lr(lr)`, `state_dict()` and `load_state_dict(d)`. The closure
(`patchlm.train.engine.make_closure`) evaluates the step's batches at the current parameters and returns the
loss; called with backward=True it also leaves the gradients in `.grad`. A first-order rule calls it once with
backward; a zeroth-order rule would call it forward-only at perturbed points; a DP rule privatises the
per-example gradients it leaves. Rules register by name with `@register_optimizer`, so `TrainConfig.optimizer`
and `patchlm train --optimizer` reach every rule, and adding one is one class in one file.

State: `state_dict()` holds tensors and JSON scalars only; `patchlm.train.checkpoint` stores it in safetensors +
JSON, so resuming is exact for any rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean

Closure = Callable[..., float]


class StepRule:
    """Base class of step rules. Subclasses set `name` through @register_optimizer and implement step()."""

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = True  # False for rules that never back-propagate (zeroth order)

    def __init__(self, params: list[torch.nn.Parameter], config: Any, model: torch.nn.Module | None = None):
        self.params = list(params)
        if not self.params:
            raise ConfigError("the optimizer got no trainable parameters")
        self.config = config
        self.model = model  # rules that need parameter names or module structure (block-wise ZO) read it

    def step(self, closure: Closure) -> float:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def metrics(self) -> dict:
        """Rule-specific figures for the training log (e.g. Newton's solve counts and times); JSON scalars."""
        return {}


class TorchStepRule(StepRule):
    """A first-order rule around a torch.optim optimizer: backward, clip (config.max_grad_norm), step."""

    def make(self, params, config) -> torch.optim.Optimizer:
        raise NotImplementedError

    def __init__(self, params, config, model=None):
        super().__init__(params, config, model)
        self.opt = self.make(self.params, config)

    def step(self, closure: Closure) -> float:
        loss = closure(backward=True)
        clip = float(self.config.max_grad_norm or 0.0)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


_RULES: dict[str, type[StepRule]] = {}


def register_optimizer(name: str):
    """Class decorator: make a StepRule available under `name`."""

    def deco(cls: type[StepRule]) -> type[StepRule]:
        cls.name = name
        _RULES[name] = cls
        return cls

    return deco


def optimizers() -> list[str]:
    """Registered rule names (patchlm.train's __init__ imports the engine's rule modules, e.g. train/zo.py)."""
    return sorted(_RULES)


def make_optimizer(name: str, params: list[torch.nn.Parameter], config: Any,
                   model: torch.nn.Module | None = None) -> StepRule:
    """The registered step rule `name` over `params`, its hyper-parameters read from `config`."""
    if name not in _RULES:
        raise UnknownNameError(f"unknown optimizer {name!r}; {did_you_mean(name, _RULES)}")
    return _RULES[name](params, config, model)



@register_optimizer("adamw")
class AdamW(TorchStepRule):
    """torch.optim.AdamW (lr, weight_decay, betas = (beta1, beta2))."""

    def make(self, params, config):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 betas=(config.beta1, config.beta2))


@register_optimizer("sgd")
class SGD(TorchStepRule):
    """torch.optim.SGD (lr, momentum, weight_decay)."""

    def make(self, params, config):
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
