"""Diagonal Fisher information of a patched model's weights, for Fisher-weighted merging.

F(W) = mean over examples of (d log p(y|x) / dW)^2, the empirical Fisher on the task's own training data
(one example per backward pass, so the square is taken per example, as the paper does). With a patch
attached, dL/dW of the frozen base weight equals dL/d(W + dW): the Fisher of the patched weight.
"""

from __future__ import annotations

import torch

from patchlm.errors import ConfigError


def estimate_fisher(base, patch, task, n_examples: int = 32, max_length: int = 128, bf16: bool = False,
                    split: str = "train") -> dict[str, torch.Tensor]:
    """module name -> diagonal Fisher of W for every module the patch changes (the patch is detached after)."""
    from patchlm.merge.patches import PatchDeltas
    from patchlm.patch import get_kind
    from patchlm.data.features import build_features, objective_for
    from patchlm.data.features import collate
    from patchlm.train.engine import causal_lm_loss

    if n_examples <= 0:
        raise ConfigError(f"n_examples must be positive, got {n_examples}")
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
        pad = base.tokenizer.pad_token_id or 0
        was = model.training
        model.eval()  # no dropout: the Fisher of the deployed model
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        for f in feats:
            batch = collate([f], pad)
            with ctx:
                loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            for n, w in weights.items():
                acc[n].add_(w.grad.float() ** 2)
                w.grad = None
        model.train(was)
        for n, p in model.named_parameters():
            p.requires_grad_(req.get(n, False))
        return {n: a / len(feats) for n, a in acc.items()}
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)
        kind.detach(model)
