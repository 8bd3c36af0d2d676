"""The one training engine: the loss, the autocast context, batches on the model's device, and the loop.

Every place in patchlm that trains (the patch trainer, federated clients, DP and DP-Flat, MindSkip routers) runs
`train_loop`; Fisher estimation and the benchmark probes use the same loss, autocast and device placement. The
loop owns the data order, the learning-rate schedule hook, the non-finite check and the progress bar; *how* the
parameters move is a step rule (`patchlm.train.optim`) that receives a loss closure, as torch.optim's
`step(closure)` contract: first-order rules call it with backward=True, zeroth-order rules evaluate it
forward-only at perturbed points, DP rules privatise the per-example gradients it leaves behind.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchlm.data.features import IGNORE
from patchlm.errors import PatchlmError, TrainingDiverged
from patchlm.models.parts import autocast, backbone_and_head, model_device

Batch = dict[str, torch.Tensor]
__all__ = [
    "StepInfo",
    "StopRequest",
    "autocast",
    "causal_lm_loss",
    "example_count",
    "example_mean_loss",
    "label_count",
    "make_closure",
    "per_example_loss",
    "to_device",
    "train_loop",
    "unit_count",
]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, int]]


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def label_count(batch: Batch) -> int:
    """Labelled next-token positions of a batch (what the mean loss averages over)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _labelled_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at labelled positions [N, V], their targets [N], the keep mask [B, T-1]).

    The output head runs only on positions that carry a label (for classification a handful per example), which
    saves the memory and time of full-vocabulary logits everywhere; models with a softcapped head run whole.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != IGNORE
    backbone, head = backbone_and_head(model)
    if backbone is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    else:
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep])
    return logits, target[keep], keep


def causal_lm_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were."""
    n = label_count(batch)
    if n == 0:
        raise PatchlmError("a training batch has no labelled tokens")
    logits, target, _ = _labelled_logits(model, batch)
    return F.cross_entropy(logits.float(), target), n


def per_example_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of each example over its labelled positions: a tensor [B] (for DP-SGD)."""
    logits, target, keep = _labelled_logits(model, batch)
    tok = F.cross_entropy(logits.float(), target, reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    return sums / keep.sum(1).clamp(min=1).to(tok.dtype)


def example_mean_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """The mean over examples of per-example losses (DP-SGD's loss), weighted by the example count."""
    return per_example_loss(model, batch).mean(), int(batch["input_ids"].shape[0])


class StopRequest:
    """Ctrl-C and SIGTERM during training become a request to stop at the next step boundary.

    Within `with StopRequest() as stop:`, the first SIGINT or SIGTERM sets `stop.signal` (the loop finishes the
    step it is in, then stops, so the caller can checkpoint); a second one interrupts at once (KeyboardInterrupt).
    Outside the main thread it installs nothing (signals are delivered to the main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGINT)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class StepInfo:
    """What the loop tells its `on_step` hook after each step."""

    step: int            # steps done so far (1-based after the first step)
    loss: float          # the loss the step rule reported (the closure's value at the current point)
    labels: int          # labelled tokens in this step's batches
    tokens: int          # non-padding tokens in this step's batches
    seconds: float       # wall time of this step (data, forward, backward, update)
    forwards: int = 0    # forward passes over a micro-batch the step rule made (2 per query for two-point ZO)


def make_closure(model, micro: Sequence[Batch], loss_fn: LossFn, bf16: bool,
                 count: Callable[[Batch], int] = label_count):
    """closure(backward=True) -> float: the loss of `micro`, the micro-batches weighted by count(batch).

    With backward=True each micro-batch's share of the loss is back-propagated (gradient accumulation); with
    backward=False the closure only evaluates (a zeroth-order rule calls it under torch.no_grad). An empty
    `micro` (an empty Poisson batch in DP-SGD) returns nan and does nothing.
    """
    device = model_device(model)
    weights = [count(b) for b in micro]
    total = sum(weights)

    def closure(backward: bool = True) -> float:
        tot = 0.0
        for b, w in zip(micro, weights):
            with autocast(device, bf16):
                loss, _ = loss_fn(model, b)
            if backward:
                (loss * w / total).backward()
            tot += float(loss.detach()) * w
        _count_forwards(closure, len(micro))
        return tot / total if total else math.nan

    def functional(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same loss as a differentiable function of the named parameters (torch.func: jvp, vmap)."""
        from torch.func import functional_call

        holder = _LossHolder(model, loss_fn)
        out = None
        for b, w in zip(micro, weights):
            with autocast(device, bf16):
                loss = functional_call(holder, {f"model.{k}": v for k, v in params.items()}, (b,), strict=False)
            out = loss * (w / total) if out is None else out + loss * (w / total)
        _count_forwards(closure, len(micro))
        return out

    def examples() -> list:
        """One closure per example of the step's micro-batches, each over a batch of that one example (same loss,
        autocast and count): per-example gradients for a Newton rule's empirical Fisher. Their forward passes
        count towards this closure's."""
        out = []
        for b in micro:
            for i in range(len(next(iter(b.values())))):
                sub = make_closure(model, [{k: v[i:i + 1] for k, v in b.items()}], loss_fn, bf16, count)
                sub.parent = closure
                out.append(sub)
        return out

    def example_loss(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """loss_fn of `batch` (one example, tensors with a leading dimension of 1) as a function of the named
        parameters: per-example gradients as torch.func.vmap(grad(...)) over a micro-batch of closure.micro, for
        losses that vmap can trace. Each call counts one forward pass (one per micro-batch under vmap)."""
        from torch.func import functional_call

        with autocast(device, bf16):
            loss = functional_call(_LossHolder(model, loss_fn), {f"model.{k}": v for k, v in params.items()},
                                   (batch,), strict=False)
        _count_forwards(closure, 1)
        return loss

    closure.forwards = 0
    closure.functional = functional
    closure.examples = examples
    closure.example_loss = example_loss
    closure.micro = list(micro)
    closure.parent = None
    return closure


def _count_forwards(closure, n: int) -> None:
    """Count n forward passes on a closure and on the closure it was split from (closure.examples())."""
    while closure is not None:
        closure.forwards += n
        closure = closure.parent


class _LossHolder(torch.nn.Module):
    """A module whose forward is loss_fn(model, batch), so torch.func.functional_call can swap its parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        return self._loss_fn(self.model, batch)[0]


def example_count(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def unit_count(batch: Batch) -> int:
    """Weight 1 for steps of a single micro-batch: the loss is back-propagated exactly as computed. (loss * w /
    total is not bit-identical to loss in float32 for every w; the patch trainer keeps the token weighting it
    always had, federated, DP, router training and Fisher never weighted.)"""
    return 1


def train_loop(model: torch.nn.Module, rule, batches: Callable[[int], Sequence[Batch]], steps: int, *,
               start: int = 0, loss_fn: LossFn = causal_lm_loss, bf16: bool = False,
               count: Callable[[Batch], int] = label_count, lr_at: Callable[[int], float] | None = None,
               on_step: Callable[[StepInfo], None] | None = None, progress: bool = False, desc: str = "train",
               stop: Callable[[], bool] | None = None) -> int:
    """Run steps start..steps-1 of training; return the number of steps done.

    batches(step) gives that step's micro-batches (CPU tensors; moved to the model's device here), so the data
    order is a pure function of the step and a resumed run sees the batches an uninterrupted one would.
    rule.step(closure) moves the parameters (see patchlm.train.optim). lr_at(step) sets the rate first.
    on_step(StepInfo) runs after every step (logging, validation, checkpoints); it may raise to stop.
    count(batch) weighs the micro-batches (labelled tokens for the token-mean loss, examples for DP's).
    stop() is asked after each step (and its hook); when it says so the loop returns early (see StopRequest).
    A non-finite loss stops training with TrainingDiverged before anything more is written.
    """
    device = model_device(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, unit="step", leave=False)
    model.train()
    step = start
    try:
        while step < steps:
            t0 = time.perf_counter()
            if lr_at is not None:
                rule.set_lr(lr_at(step))
            micro = [to_device(b, device) for b in batches(step)]
            closure = make_closure(model, micro, loss_fn, bf16, count)
            loss = rule.step(closure)
            if micro and not math.isfinite(loss):
                raise TrainingDiverged(f"the training loss became {loss} at step {step + 1}: lower the learning "
                                       "rate (lr) or check the data; the last checkpoint is kept")
            step += 1
            info = StepInfo(step=step, loss=loss, labels=sum(label_count(b) for b in micro if "labels" in b),
                            tokens=sum(int(b["attention_mask"].sum()) for b in micro if "attention_mask" in b),
                            seconds=time.perf_counter() - t0, forwards=closure.forwards)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(info)
            if stop is not None and stop():
                break
    finally:
        if bar:
            bar.close()
    return step
