"""Client-side differential privacy for federated LoRA: DP-SGD with Opacus, and DP-Flat as an option.

DP-SGD (Abadi et al.) on the adapter parameters only: Poisson sampling of each batch (rate q = B / n), per-example
gradients (Opacus GradSampleModule; patchlm's LoraLinear goes through Opacus's functorch path), clipping to
`max_grad_norm`, Gaussian noise `noise_multiplier * max_grad_norm`, and Opacus's RDP accountant. Epsilon is
reported per client per round (this round's steps) and in total (RDP composition of every round's
(noise, q, steps) for that client, which `total_epsilon` computes from the history).

DP-Flat (Chen et al. 2024), three parts, each keeping the DP-SGD guarantee because each only post-processes
privatised gradients or uses public data:
1. perturbation-aware min-max step: before a step, weights move by gamma * ||w|| * g_hat / ||g_hat|| per tensor,
   where g_hat is the *previous privatised* gradient (post-processing, no extra privacy cost); the new DP
   gradient is taken at the perturbed point and applied to the unperturbed weights. The paper perturbs along the
   current (non-private) ascent direction, which costs privacy; we do not.
2. flatness-guided choice of layers: on *public* data, a teacher adapter is trained; for each layer we measure
   how much sharper the loss gets when that layer's adapter is removed; the layers whose removal hurts flatness
   least are dropped (their adapters stay zero and get no noise).
3. distillation toward a non-private copy: loss + lambda * ||P - P_teacher||^2 with the teacher trained on public
   data only; its gradient is added after privatisation (it never touches private data).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from patchlm.errors import ConfigError, PatchlmError


@dataclass
class DPConfig:
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float | None = None          # default: 1 / n^1.1 for a client with n examples
    flat: bool = False                  # DP-Flat's three parts
    flat_gamma: float = 0.05            # relative size of the min-max perturbation
    flat_warm: float = 0.5              # fraction of the steps (the early ones) that use the min-max step
    flat_keep: float = 0.5              # fraction of layers kept by the flatness-guided choice
    flat_lambda: float = 0.01           # distillation weight toward the public teacher
    teacher_steps: int = 10             # non-private steps of the teacher on public data

    def __post_init__(self):
        if self.noise_multiplier < 0:
            raise ConfigError(f"--dp-noise must be >= 0, got {self.noise_multiplier}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"--dp-clip must be positive, got {self.max_grad_norm}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if not 0 < self.flat_keep <= 1:
            raise ConfigError(f"flat_keep must be in (0, 1], got {self.flat_keep}")

    def to_dict(self) -> dict:
        return asdict(self)


def default_delta(n: int) -> float:
    return 1.0 / (max(n, 2) ** 1.1)


def total_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """RDP composition of (noise_multiplier, sample_rate, steps) entries -> epsilon at delta."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------- loss per example
def per_example_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each example over its labelled positions: a tensor [B]."""
    from patchlm.data.features import IGNORE

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != IGNORE
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is not None and head is not None:
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep])
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    counts = keep.sum(1).clamp(min=1).to(tok.dtype)
    return sums / counts


# ---------------------------------------------------------------- DP-Flat helpers
def _sharpness(model, params: list[torch.nn.Parameter], batch, rho: float, draws: int, gen: torch.Generator,
               autocast) -> float:
    """E[L(w + eps)] - L(w) with eps ~ N(0, (rho |w|)^2) on the given adapter tensors (no grad)."""
    with torch.no_grad(), autocast():
        base = float(per_example_loss(model, batch).mean())
        tot = 0.0
        for _ in range(draws):
            noises = []
            for p in params:
                scale = rho * (float(p.detach().float().abs().mean()) + 1e-8)
                e = torch.randn(p.shape, generator=gen) * scale
                p.add_(e.to(p.dtype))
                noises.append(e)
            tot += float(per_example_loss(model, batch).mean())
            for p, e in zip(params, noises):
                p.sub_(e.to(p.dtype))
    return tot / draws - base


def _layer_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def flatness_layer_choice(model, modules: dict[str, torch.nn.Module], batch, keep: float, seed: int,
                          autocast, rho: float = 0.5, draws: int = 2) -> list[str]:
    """Layers to keep: those whose adapter's removal makes the (public-data) loss sharpest."""
    layers: dict[str, list[str]] = {}
    for n in modules:
        layers.setdefault(_layer_of(n), []).append(n)
    if len(layers) <= 1:
        return sorted(layers)
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    gen = torch.Generator().manual_seed(seed)
    ref = _sharpness(model, params, batch, rho, draws, gen, autocast)
    hurt = {}
    for layer, names in layers.items():
        saved = [(modules[n].lora_B, modules[n].lora_B.detach().clone()) for n in names]
        with torch.no_grad():
            for b, _ in saved:
                b.zero_()
        gen = torch.Generator().manual_seed(seed)  # same draws for every layer: a paired comparison
        hurt[layer] = _sharpness(model, params, batch, rho, draws, gen, autocast) - ref
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    k = max(1, round(keep * len(layers)))
    return sorted(sorted(hurt, key=lambda lay: -hurt[lay])[:k])


# ---------------------------------------------------------------- training
def _make_dp_optimizer(base_opt, dp: DPConfig, batch_size: int, teacher: dict | None, lam: float):
    from opacus.optimizers import DPOptimizer

    class _Opt(DPOptimizer):
        """DPOptimizer that adds the distillation gradient after privatisation (DP-Flat part 3)."""

        def pre_step(self, closure=None):
            ok = super().pre_step(closure)
            if ok and teacher:
                for p in self.params:
                    t = teacher.get(id(p))
                    if t is not None and p.grad is not None:
                        p.grad.add_((p.detach() - t) * (2 * lam))
            return ok

    return _Opt(base_opt, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                expected_batch_size=batch_size, loss_reduction="mean")


def dp_train(model, params: list[torch.nn.Parameter], feats: list[dict], pad_id: int, *, steps: int,
             batch_size: int, lr: float, dp: DPConfig, seed: int = 0, bf16: bool = False,
             lora_modules: dict[str, torch.nn.Module] | None = None, public_feats: list[dict] | None = None,
             log=None) -> dict:
    """DP-SGD (AdamW on privatised gradients) of `params` for `steps` Poisson-sampled batches.

    Returns the privacy record: epsilon (this call), delta, sample_rate, steps, noise_multiplier, and for DP-Flat
    the kept layers. `model`'s parameters other than `params` must be frozen.
    """
    from opacus.accountants import RDPAccountant
    from opacus.grad_sample import GradSampleModule

    from patchlm.data.features import collate

    n = len(feats)
    if n == 0:
        raise PatchlmError("DP training needs at least one example")
    for p in model.parameters():
        if p.requires_grad and not any(p is q for q in params):
            raise ConfigError("DP training: a trainable parameter outside the adapter would leak without noise")
    q = min(1.0, batch_size / n)
    delta = dp.delta if dp.delta is not None else default_delta(n)
    device = next(model.parameters()).device
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    record: dict = {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "sample_rate": q,
                    "delta": delta}
    teacher = None
    if dp.flat:
        if not public_feats or not lora_modules:
            raise ConfigError("DP-Flat needs public data (public_feats) and the LoRA modules")
        teacher_state = _train_teacher(model, params, public_feats, pad_id, dp.teacher_steps, batch_size, lr,
                                       seed, autocast)
        pub_batch = {k: v.to(device) for k, v in collate(public_feats[:batch_size], pad_id).items()}
        kept = flatness_layer_choice(model, lora_modules, pub_batch, dp.flat_keep, seed, autocast)
        # reset the adapter to its initial state; freeze dropped layers (B stays 0, no noise spent on them)
        with torch.no_grad():
            for p, (init, _) in zip(params, teacher_state):
                p.copy_(init)
        dropped = {id(m.lora_A) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        dropped |= {id(m.lora_B) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        for p in params:
            if id(p) in dropped:
                p.requires_grad_(False)
        teacher = {id(p): t for p, (_, t) in zip(params, teacher_state) if id(p) not in dropped}
        params = [p for p in params if id(p) not in dropped]
        record.update({"flat": True, "kept_layers": kept, "num_layers": len({_layer_of(x) for x in lora_modules})})

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = _make_dp_optimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), dp, batch_size, teacher,
                             dp.flat_lambda)
    acc = RDPAccountant()
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=q))
    gen = torch.Generator().manual_seed(seed)
    prev_grad: list[torch.Tensor] | None = None
    warm = int(dp.flat_warm * steps) if dp.flat else 0
    losses = []
    model.train()
    try:
        for step in range(steps):
            idx = (torch.rand(n, generator=gen) < q).nonzero()[:, 0].tolist()
            eps_added = None
            if dp.flat and step < warm and prev_grad is not None:
                eps_added = []
                with torch.no_grad():
                    for p, g in zip(params, prev_grad):
                        gn = float(g.norm())
                        e = g * (dp.flat_gamma * float(p.norm()) / gn) if gn > 0 else torch.zeros_like(p)
                        p.add_(e)
                        eps_added.append(e)
            if idx:
                batch = {k: v.to(device) for k, v in collate([feats[i] for i in idx], pad_id).items()}
                with autocast():
                    loss = per_example_loss(model, batch).mean()
                loss.backward()
                losses.append(float(loss))
            else:  # an empty Poisson batch: the step still happens and adds pure noise
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if eps_added is not None:
                with torch.no_grad():
                    for p, e in zip(params, eps_added):
                        p.sub_(e)
            opt.step()
            if dp.flat:
                prev_grad = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            opt.zero_grad(set_to_none=True)
            if log and (step + 1) % 10 == 0:
                log(f"dp step {step + 1}/{steps} loss {losses[-1] if losses else float('nan'):.4f}")
    finally:
        gsm._close()
    record.update({"steps": steps, "epsilon": float(acc.get_epsilon(delta)) if dp.noise_multiplier > 0 else math.inf,
                   "train_loss": sum(losses) / max(1, len(losses))})
    return record


def _train_teacher(model, params, public_feats, pad_id, steps, batch_size, lr, seed, autocast):
    """Train the adapter non-privately on public data; return [(initial value, teacher value)] per param."""
    import random

    from patchlm.data.features import collate

    init = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr)
    device = next(model.parameters()).device
    order = list(range(len(public_feats)))
    random.Random(seed).shuffle(order)
    for s in range(steps):
        sel = [public_feats[order[(s * batch_size + j) % len(order)]] for j in range(batch_size)]
        batch = {k: v.to(device) for k, v in collate(sel, pad_id).items()}
        with autocast():
            loss = per_example_loss(model, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [(i, p.detach().clone()) for i, p in zip(init, params)]
