"""Diagonal Fisher information of a patched model's weights, for Fisher-weighted merging.

F(W) = mean over examples of (d log p(y|x) / dW)^2, the empirical Fisher on the task's own training data
(one example per backward pass, so the square is taken per example, as the paper does). With a patch
attached, dL/dW of the frozen base weight equals dL/d(W + dW): the Fisher of the patched weight. The loss,
the padding, the autocast and the device placement are the training engine's.
"""

from __future__ import annotations

import torch

from patchlm.data.features import build_features, collate, objective_for, pad_id
from patchlm.errors import ConfigError
from patchlm.merge.config import MergeConfig
from patchlm.merge.patch_merge import PatchDeltas
from patchlm.models.parts import model_device
from patchlm.patch import get_kind
from patchlm.train.engine import causal_lm_loss, make_closure, to_device, unit_count


def estimate_fisher(base, patch, task, n_examples: int = MergeConfig.fisher_examples, max_length: int = 128,
                    bf16: bool = MergeConfig.bf16, split: str = "train") -> dict[str, torch.Tensor]:
    """module name -> diagonal Fisher of W (float32, on the CPU beside the patch's tensors) for every module the
    patch changes.

    The patch is attached for the estimate and detached after; the model's train/eval mode and requires_grad
    flags are restored."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples <= 0:
        raise ConfigError(f"fisher_examples must be a positive integer, got {n_examples!r}", field="fisher_examples")
    modules = PatchDeltas(patch).modules
    model = base.model
    patch.apply(base)
    kind = get_kind(patch.kind)
    weights = {}
    try:
        for name in modules:
            mod = model.get_submodule(name)
            lin = getattr(mod, "base", mod)
            weights[name] = lin.weight
        feats = build_features(task, split, base.tokenizer, objective_for(task), max_length, limit=n_examples)
        req = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        pad = pad_id(base.tokenizer)
        device = model_device(model)
        was = model.training
        model.eval()  # no dropout: the Fisher of the deployed model
        for f in feats:
            # the engine's closure does the forward and backward: one example, its loss back-propagated as is
            make_closure(model, [to_device(collate([f], pad), device)], causal_lm_loss, bf16, unit_count)()
            for n, w in weights.items():
                acc[n].add_(w.grad.float() ** 2)
                w.grad = None
        model.train(was)
        for n, p in model.named_parameters():
            p.requires_grad_(req.get(n, False))
        return {n: (a / len(feats)).cpu() for n, a in acc.items()}
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)
        kind.detach(model)
