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
   least are dropped (their adapters stay zero and get no noise). The scores are taken in float32 even when
   training runs under bf16 autocast (bf16 rounding is as large as the differences they measure).
3. distillation toward a non-private copy: loss + lambda * ||P - P_teacher||^2 with the teacher trained on public
   data only; its gradient is added after privatisation (it never touches private data). The paper writes the
   unsquared norm, and its official code adds lambda ||P - P_teacher|| to every example's loss, so that term's
   gradient (of norm lambda whatever the distance) is clipped and noised with the data's; ours is squared (a pull
   that grows with the distance) and exact (public, so it needs no noise).
"""

from __future__ import annotations

import math
import random

import torch

from patchlm.data.features import collate
from patchlm.errors import ConfigError, PatchlmError
from patchlm.federated.config import DPConfig
from patchlm.train.config import TrainConfig
from patchlm.train.engine import (
    StepInfo,
    autocast,
    example_mean_loss,
    per_example_loss,
    to_device,
    train_loop,
    unit_count,
)
from patchlm.train.optim import StepRule, make_optimizer

__all__ = ["DPAdamW", "DPConfig", "default_delta", "dp_train", "flatness_layer_choice", "flatness_scores", "keep_count",
           "random_layer_choice", "top_layers", "total_epsilon", "train_public_teacher"]


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


# ---------------------------------------------------------------- DP-Flat helpers
def _sharpness_draws(model, params: list[torch.nn.Parameter], batch, rho: float, draws: int, gen: torch.Generator,
                     amp) -> list[float]:
    """L(w + e_j) - L(w) for each draw j, e_j ~ N(0, (rho |w|)^2) on the given adapter tensors (no grad).

    Each loss runs in its own autocast context: autocast caches its bf16 copies of the float32 weights until the
    context exits, so losses taken in one context would all see the first weights (every score 0 under bf16)."""

    def loss() -> float:
        with amp():
            return float(per_example_loss(model, batch).mean())

    out = []
    with torch.no_grad():
        base = loss()
        orig = [p.detach().clone() for p in params]  # restored by copy: (w + e) - e is not w in floating point
        for _ in range(draws):
            for p, w in zip(params, orig, strict=True):
                scale = rho * (float(w.float().abs().mean()) + 1e-8)
                # drawn on the CPU generator, so the choice is the same on any device
                p.add_((torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype))
            out.append(loss() - base)
            for p, w in zip(params, orig, strict=True):
                p.copy_(w)
    return out


def _layer_of(name: str) -> str:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _layers(modules: dict[str, torch.nn.Module]) -> dict[str, list[str]]:
    """Layer name -> the names of its adapted modules."""
    layers: dict[str, list[str]] = {}
    for n in modules:
        layers.setdefault(_layer_of(n), []).append(n)
    return layers


def flatness_scores(model, modules: dict[str, torch.nn.Module], batch, seed: int, amp, rho: float = 0.5,
                    draws: int = 2) -> dict[str, list[float]]:
    """Per layer and per draw j, how much sharper the loss on `batch` gets along draw j when the layer's adapter is
    removed: (L'(w + e_j) - L'(w)) - (L(w + e_j) - L(w)), L' the loss without the layer's adapter (its lora_B
    zeroed, then restored). The draws e_j come from `seed` and are the same for every layer (a paired comparison),
    so a layer's draws are independent estimates of its score, and their spread measures the estimate's noise.
    `amp()` gives the autocast context."""
    layers = _layers(modules)
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    ref = _sharpness_draws(model, params, batch, rho, draws, torch.Generator().manual_seed(seed), amp)
    out = {}
    for layer, names in layers.items():
        saved = [(modules[n].lora_B, modules[n].lora_B.detach().clone()) for n in names]
        with torch.no_grad():
            for b, _ in saved:
                b.zero_()
        per = _sharpness_draws(model, params, batch, rho, draws, torch.Generator().manual_seed(seed), amp)
        out[layer] = [a - r for a, r in zip(per, ref, strict=True)]
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return out


def flatness_layer_choice(model, modules: dict[str, torch.nn.Module], batch, keep: float, seed: int,
                          amp, rho: float = 0.5, draws: int = 2, scores: dict[str, float] | None = None) -> list[str]:
    """Layers to keep: those whose adapter's removal makes the (public-data) loss sharpest, by the mean over draws
    of flatness_scores. `scores`, when given, receives each layer's mean (the ranking key)."""
    layers = _layers(modules)
    if len(layers) <= 1:
        return sorted(layers)
    hurt = {lay: sum(v) / len(v) for lay, v in flatness_scores(model, modules, batch, seed, amp, rho, draws).items()}
    if scores is not None:
        scores.update(hurt)
    return top_layers(hurt, keep)


def top_layers(scores: dict[str, float], keep: float) -> list[str]:
    """The keep_count(len(scores), keep) layers of highest score, in name order (the layers part's ranking)."""
    return sorted(sorted(scores, key=lambda lay: -scores[lay])[:keep_count(len(scores), keep)])


def keep_count(num_layers: int, keep: float) -> int:
    """How many of `num_layers` layers the layers part keeps at fraction `keep` (at least one)."""
    return max(1, round(keep * num_layers))


def random_layer_choice(layers: list[str], keep: float, seed: int) -> list[str]:
    """The layers part's control: as many layers as the flatness choice keeps, drawn uniformly from `seed`."""
    return sorted(random.Random(seed).sample(sorted(layers), keep_count(len(layers), keep)))


# ---------------------------------------------------------------- the DP step rule
class DPAdamW(StepRule):
    """DP-SGD's step: AdamW on privatised gradients (Opacus's DPOptimizer: per-example clipping to
    dp.max_grad_norm, Gaussian noise dp.noise_multiplier * max_grad_norm), with the RDP accountant attached.

    The model must be wrapped in opacus.GradSampleModule, so that the closure's backward leaves per-example
    gradients. An empty Poisson batch (the closure back-propagates nothing) still takes the step: pure noise.
    With `teacher` (DP-Flat part 3) the distillation gradient 2 lambda (w - w_teacher) is added after
    privatisation, and with `warm_steps` (part 1) for the first `warm_steps` steps the closure runs at the
    min-max point w + gamma |w| g/|g| (g: the previous privatised gradient, so the perturbation is
    post-processing) while the step moves the unperturbed weights.
    Not registered by name: it needs the GradSampleModule and the sample rate, which only dp_train knows.
    """

    name = "dp-adamw"

    def __init__(self, params, config, dp: DPConfig, *, expected_batch_size: int, sample_rate: float,
                 teacher: dict[int, torch.Tensor] | None = None, warm_steps: int = 0):
        """config: lr, weight_decay, beta1, beta2 of the AdamW (a TrainConfig, see step_config)."""
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        super().__init__(params, config)
        lam = dp.flat_lambda

        class _Distilled(DPOptimizer):
            """DPOptimizer that adds the distillation gradient after privatisation (DP-Flat part 3)."""

            def pre_step(self, closure=None):
                ok = super().pre_step(closure)
                if ok and teacher:
                    for p in self.params:
                        t = teacher.get(id(p))
                        if t is not None and p.grad is not None:
                            p.grad.add_((p.detach() - t) * (2 * lam))
                return ok

        inner = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(config.beta1, config.beta2))
        self.opt = _Distilled(inner, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                              expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.accountant = RDPAccountant()
        self.opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        self.gamma = dp.flat_gamma
        self.flat = warm_steps > 0  # the min-max step (DP-Flat part 1) keeps the previous privatised gradient
        self.warm_steps = warm_steps
        self.steps_done = 0
        self.prev_grad: list[torch.Tensor] | None = None

    def _perturb(self) -> list[torch.Tensor] | None:
        """DP-Flat part 1: move to the min-max point along the previous privatised gradient; return the moves."""
        if not self.flat or self.steps_done >= self.warm_steps or self.prev_grad is None:
            return None
        moves = []
        with torch.no_grad():
            for p, g in zip(self.params, self.prev_grad, strict=True):
                gn = float(g.norm())
                e = g * (self.gamma * float(p.norm()) / gn) if gn > 0 else torch.zeros_like(p)
                p.add_(e)
                moves.append(e)
        return moves

    def step(self, closure) -> float:
        moves = self._perturb()
        loss = closure(backward=True)
        for p in self.params:
            if getattr(p, "grad_sample", None) is None:  # an empty Poisson batch: the step adds pure noise
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        if moves is not None:
            with torch.no_grad():
                for p, e in zip(self.params, moves, strict=True):
                    p.sub_(e)
        self.opt.step()
        if self.flat and self.steps_done + 1 < self.warm_steps:
            self.prev_grad = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                              for p in self.params]
        self.opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss

    def set_lr(self, lr: float) -> None:
        for g in self.opt.original_optimizer.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.original_optimizer.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.opt.original_optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta))


# ---------------------------------------------------------------- training
def poisson_batches(feats: list[dict], pad_id: int, steps: int, sample_rate: float, seed: int):
    """batches(step) of DP-SGD: each example joins step s's batch with probability sample_rate, drawn from one
    generator seeded by `seed` for all steps up front (so a step's batch is a function of the step alone)."""
    gen = torch.Generator().manual_seed(seed)
    draws = [(torch.rand(len(feats), generator=gen) < sample_rate).nonzero()[:, 0].tolist() for _ in range(steps)]

    def batches(s: int) -> list[dict[str, torch.Tensor]]:
        idx = draws[s]
        return [collate([feats[i] for i in idx], pad_id)] if idx else []

    return batches


def step_config(lr: float, weight_decay: float = 0.0) -> TrainConfig:
    """The AdamW settings of DP training: rate lr (constant), no whole-batch clipping (DP clips per example)."""
    return TrainConfig(lr=lr, weight_decay=weight_decay, max_grad_norm=0.0, schedule="constant", warmup=0,
                       progress=False)


def dp_train(model, params: list[torch.nn.Parameter], feats: list[dict], pad_id: int, *, steps: int,
             batch_size: int, lr: float, dp: DPConfig, seed: int = 0, bf16: bool = False,
             lora_modules: dict[str, torch.nn.Module] | None = None, public_feats: list[dict] | None = None,
             log=None) -> dict:
    """DP-SGD (AdamW on privatised gradients) of `params` for `steps` Poisson-sampled batches, on the engine.

    Returns the privacy record: epsilon (this call), delta, sample_rate, steps, noise_multiplier, and for DP-Flat
    the kept layers. `model`'s parameters other than `params` must be frozen.
    """
    from opacus.grad_sample import GradSampleModule

    n = len(feats)
    if n == 0:
        raise PatchlmError("DP training needs at least one example")
    for p in model.parameters():
        if p.requires_grad and not any(p is q for q in params):
            raise ConfigError("DP training: a trainable parameter outside the adapter would leak without noise")
    q = min(1.0, batch_size / n)
    delta = dp.delta if dp.delta is not None else default_delta(n)
    device = next(model.parameters()).device
    record: dict = {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "sample_rate": q,
                    "delta": delta}
    teacher = None
    if dp.flat:
        record.update({"flat": True, "flat_parts": dp.flat_parts})
    if dp.has("layers") or dp.has("distill"):  # the parts that need the teacher trained on public data
        if not public_feats or not lora_modules:
            raise ConfigError("DP-Flat's layers and distill parts need public data (public_feats) and the LoRA "
                              "modules", field="dp_flat")
        teacher_state = train_public_teacher(model, params, public_feats, pad_id, dp.teacher_steps, batch_size, lr,
                                       seed, bf16)
        layers = sorted({_layer_of(x) for x in lora_modules})
        kept = layers
        if dp.has("layers") and dp.flat_choice == "random":
            kept = random_layer_choice(layers, dp.flat_keep, seed)
        elif dp.has("layers"):
            pub_batch = to_device(collate(public_feats[:batch_size], pad_id), device)
            hurt: dict[str, float] = {}
            # scored in float32 whatever the training precision: the scores are loss differences of a few 1e-3, at
            # bf16's resolution, so under bf16 a change of 1e-7 in the weights reorders them (bench/dpflat.py's
            # numerics row: Spearman 0.12 between two such bf16 scorings, 0.29 between bf16 and float32)
            kept = flatness_layer_choice(model, lora_modules, pub_batch, dp.flat_keep, seed,
                                         lambda: autocast(device, False), scores=hurt)
            record.update({"layer_sharpness_change": hurt, "flat_score_dtype": "float32"})
        # reset the adapter to its initial state; freeze dropped layers (B stays 0, no noise spent on them)
        with torch.no_grad():
            for p, (init, _) in zip(params, teacher_state, strict=True):
                p.copy_(init)
        dropped = {id(m.lora_A) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        dropped |= {id(m.lora_B) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        for p in params:
            if id(p) in dropped:
                p.requires_grad_(False)
        if dp.has("distill"):
            teacher = {id(p): t for p, (_, t) in zip(params, teacher_state, strict=True) if id(p) not in dropped}
        params = [p for p in params if id(p) not in dropped]
        record.update({"kept_layers": kept, "num_layers": len(layers)})

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    rule = DPAdamW(params, step_config(lr), dp, expected_batch_size=batch_size, sample_rate=q, teacher=teacher,
                   warm_steps=int(dp.flat_warm * steps) if dp.has("minmax") else 0)
    losses: list[float] = []

    def on_step(info: StepInfo) -> None:
        if not math.isnan(info.loss):  # nan: an empty Poisson batch
            losses.append(info.loss)
        if log and info.step % 10 == 0:
            log(f"dp step {info.step}/{steps} loss {losses[-1] if losses else float('nan'):.4f}")

    try:
        train_loop(model, rule, poisson_batches(feats, pad_id, steps, q, seed), steps, loss_fn=example_mean_loss,
                   bf16=bf16, count=unit_count, on_step=on_step)
    finally:
        gsm._close()
    record.update({"steps": steps, "epsilon": rule.epsilon(delta) if dp.noise_multiplier > 0 else math.inf,
                   "train_loss": sum(losses) / max(1, len(losses))})
    return record


def train_public_teacher(model, params, public_feats, pad_id, steps, batch_size, lr, seed, bf16):
    """Train the adapter non-privately on public data (AdamW at torch's default weight decay, no clipping);
    return [(initial value, teacher value)] per param."""
    init = [p.detach().clone() for p in params]
    order = list(range(len(public_feats)))
    random.Random(seed).shuffle(order)

    def batches(s: int) -> list[dict[str, torch.Tensor]]:
        return [collate([public_feats[order[(s * batch_size + j) % len(order)]] for j in range(batch_size)], pad_id)]

    cfg = step_config(lr, weight_decay=1e-2)  # torch.optim.AdamW's default, as the teacher always had
    train_loop(model, make_optimizer("adamw", params, cfg), batches, steps, loss_fn=example_mean_loss, bf16=bf16,
               count=unit_count)
    return [(i, p.detach().clone()) for i, p in zip(init, params, strict=True)]
