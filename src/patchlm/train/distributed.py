"""Data-parallel training under `torchrun --nproc-per-node N -m patchlm train ...` (or `accelerate launch`).

Every rank builds the same model and patch (same seed), takes rows rank, rank+N, ... of every micro-batch of the
step's global batch, and back-propagates its share; the gradients are then all-reduced (gloo on CPU, NCCL on GPU)
with each rank's share weighted by its labelled-token count, so the update is the one a single process makes on
the whole global batch (the token-mean loss), to float rounding. The reduction is done on the trainable
parameters themselves, the way DistributedDataParallel does it, without wrapping the model (patch kinds keep
finding their modules). Zeroth-order rules work too: every rank draws the same directions and the losses are
all-reduced. Rules that read the step's batch themselves (forward-grad's jvp, Newton's per-example gradients)
refuse to run data-parallel. Only rank 0 writes checkpoints, metrics and the patch; every rank resumes from rank
0's checkpoint (one machine, or a shared file system).
"""

from __future__ import annotations

import atexit
import math
import os

import torch
import torch.distributed as dist

from patchlm.errors import ConfigError
from patchlm.train.engine import label_count
from patchlm.train.optim import StepRule


def env_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when unset or unreadable)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class DataParallel:
    """The process group of a torchrun/accelerate launch (a no-op object for a single process)."""

    def __init__(self):
        self.world = env_world_size()
        self.enabled = self.world > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.enabled else 0
        self.cuda = self.enabled and torch.cuda.is_available()
        if self.enabled and not dist.is_initialized():
            if self.cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if self.cuda else "gloo")
            atexit.register(_destroy)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.local_labels = 0
        self.local_tokens = 0
        self.step_labels = 0  # the last step's labelled / non-padding tokens over every rank (for the log)
        self.step_tokens = 0

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0, or the only process)."""
        return self.rank == 0

    def place(self, model: torch.nn.Module) -> None:
        """On a multi-GPU launch each rank trains on its own GPU (LOCAL_RANK); on CPU nothing moves."""
        if self.cuda:
            model.to(self.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, micro: list[dict]) -> list[dict]:
        """This rank's rows of each collated micro-batch (rank, rank+world, ...); records its token counts."""
        if not self.enabled:
            return micro
        out = [{k: v[self.rank:: self.world] for k, v in b.items()} for b in micro]
        out = [b for b in out if b["input_ids"].shape[0]]
        self.local_labels = sum(label_count(b) for b in out if "labels" in b)
        self.local_tokens = sum(int(b["attention_mask"].sum()) for b in out if "attention_mask" in b)
        return out

    def rule(self, rule: StepRule) -> StepRule:
        return _AllReduceRule(rule, self) if self.enabled else rule

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _whole_batch_only(rule: str, what: str):
    def refuse(*args, **kwargs):
        raise ConfigError(f"optimizer {rule} reads the step's batch itself ({what}), which data-parallel training "
                          "does not split: train it on one process", field="optimizer")

    return refuse


class _AllReduceRule(StepRule):
    """Wraps a step rule: its closure's gradients and loss become the global batch's (label-count weighted)."""

    def __init__(self, inner: StepRule, dp: DataParallel):  # no super().__init__: the inner rule owns params
        self.inner, self.dp = inner, dp
        self.params, self.config, self.model = inner.params, inner.config, inner.model
        self.name = inner.name
        self.needs_grad = inner.needs_grad

    def step(self, closure) -> float:
        dp, params = self.dp, self.params

        def reduced(backward: bool = True) -> float:
            n = dp.local_labels
            loss = closure(backward=backward) if n else 0.0
            has = [p.grad is not None for p in params] if backward else []
            sums = dp.all_sum([float(n), loss * n if n else 0.0, float(dp.local_tokens), *map(float, has)])
            n_all, loss_sum = sums[0], sums[1]
            dp.step_labels, dp.step_tokens = int(sums[0]), int(sums[2])
            if backward:
                share = n / n_all if n_all else 0.0
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(dp.device) * share
                dist.all_reduce(flat)
                off = 0
                for p, g, any_grad in zip(params, grads, sums[3:]):
                    k = g.numel()
                    # a parameter no rank back-propagated into keeps grad None, as on one process
                    p.grad = flat[off: off + k].view_as(g).to(device=p.device, dtype=g.dtype) if any_grad else None
                    off += k
            return loss_sum / n_all if n_all else math.nan

        reduced.forwards = 0
        reduced.parent = None
        reduced.micro = closure.micro  # this rank's share; per-example losses over it refuse (example_loss)
        reduced.functional = _whole_batch_only(self.name, "forward-mode derivatives of the loss")
        reduced.examples = _whole_batch_only(self.name, "per-example gradients")
        reduced.example_loss = _whole_batch_only(self.name, "per-example gradients")
        return self.inner.step(reduced)

    def set_lr(self, lr: float) -> None:
        self.inner.set_lr(lr)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def metrics(self) -> dict:
        return self.inner.metrics()
