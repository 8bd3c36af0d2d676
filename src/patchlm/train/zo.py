"""Zeroth-order step rules (ZO-Bench, MeZO): the gradient estimated from forward passes along seeded directions.

One query: a seed s; the loss at theta + eps z(s) and at theta - eps z(s) (or at theta, one-sided); the projected
gradient g = (L+ - L-) / (2 eps); the estimate g z(s). The direction z(s) is regenerated tensor by tensor from a
private torch.Generator seeded by (run seed, step, query, tensor index), never stored, so a resumed run draws the
same directions (the step counter is in the rule's state) and dropout or data order are untouched.

Exact restore. MeZO perturbs in place (+eps z, -2 eps z, +eps z) and relies on that to restore theta; in fp32 it
does not (46% of the elements come back changed after one round trip, on N(0, 0.02) weights with eps 1e-3:
tests/test_zo.py checks it), and in lower precision the rounding is coarser. Here theta is never modified to
evaluate a perturbed point:
- a tensor owned by leaf modules only (nn.Linear, nn.Embedding, norms: full fine-tuning) is perturbed *during
  its module's forward*: a pre-hook puts theta + sum_j c_j z_j in the module's parameter slot and the post-hook
  puts theta back, so one perturbed tensor exists at a time (the largest, e.g. the embedding) and theta is
  bit-identical afterwards in any dtype;
- any other tensor (adapter tensors such as LoRA's A/B or MoS's shared pools, small by design) is perturbed in
  place and restored from a copy kept for the evaluation.
Only the update (theta -= lr g z) writes theta, in place, tensor by tensor.

Rules: zo-sgd, zo-sgd-sign (element-wise sign of the estimate, as ZO-signSGD and ZO-Bench's paper define it; the
official code takes the sign of the scalar g instead), zo-sgd-mmt (momentum buffer), zo-sgd-cons (keep the best of
theta, theta - step, theta + step), zo-adam (Adam moments on the estimate), forward-grad (the exact directional
derivative by torch.func.jvp). Enhancements, for every rule: block-wise (perturb and update one block per step,
cycling: transformer layer, attention/MLP half, or single module), sparse (a fixed fraction of each tensor, the
smallest-magnitude entries as in Sparse-MeZO or a seeded random subset: the fraction is exact), and hybrid
(first-order SGD on chosen decoder layers, zeroth order on the rest).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch

from patchlm.errors import ConfigError
from patchlm.train.optim import StepRule, register_optimizer
from patchlm.typed import parse_index_list

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# decoder-layer sub-module names -> the half (attention or MLP) they belong to, per family
_HALVES = {
    "llama": {"self_attn": "attn", "input_layernorm": "attn", "mlp": "mlp", "post_attention_layernorm": "mlp"},
    "gemma3": {"self_attn": "attn", "input_layernorm": "attn", "post_attention_layernorm": "attn",
               "mlp": "mlp", "pre_feedforward_layernorm": "mlp", "post_feedforward_layernorm": "mlp"},
}
_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma3": "gemma3", "gemma3_text": "gemma3"}
BLOCK_MODES = ("none", "layer", "sublayer", "linear")
SPARSE_MODES = ("magnitude", "random")
DISTRIBUTIONS = ("gaussian", "rademacher")


def parse_layers(text: str) -> list[int]:
    """zo_fo_layers: '0-3,7' -> [0, 1, 2, 3, 7]."""
    return parse_index_list(text, "zo_fo_layers")


def check_options(cfg) -> None:
    """Range checks of the zeroth-order fields of a TrainConfig (before any model is loaded)."""
    eps = float(cfg.zo_eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"zo_eps must be a positive number, got {cfg.zo_eps}", field="zo_eps")
    if int(cfg.zo_queries) < 1:
        raise ConfigError(f"zo_queries must be at least 1, got {cfg.zo_queries}", field="zo_queries")
    sp = float(cfg.zo_sparsity)
    if not 0 < sp <= 1:
        raise ConfigError(f"zo_sparsity is the fraction of each tensor perturbed, in (0, 1]; got {cfg.zo_sparsity}",
                          field="zo_sparsity")
    if cfg.zo_sparse_mode not in SPARSE_MODES:
        raise ConfigError(f"unknown zo_sparse_mode {cfg.zo_sparse_mode!r}; choices: {', '.join(SPARSE_MODES)}",
                          field="zo_sparse_mode")
    if cfg.zo_distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown zo_distribution {cfg.zo_distribution!r}; choices: {', '.join(DISTRIBUTIONS)}",
                          field="zo_distribution")
    if cfg.zo_block not in BLOCK_MODES:
        raise ConfigError(f"unknown zo_block {cfg.zo_block!r}; choices: {', '.join(BLOCK_MODES)}", field="zo_block")
    if not 0 <= float(cfg.zo_momentum) < 1:
        raise ConfigError(f"zo_momentum must be in [0, 1), got {cfg.zo_momentum}", field="zo_momentum")
    if cfg.zo_fo_lr is not None and not (math.isfinite(cfg.zo_fo_lr) and cfg.zo_fo_lr > 0):
        raise ConfigError(f"zo_fo_lr must be a positive number, got {cfg.zo_fo_lr}", field="zo_fo_lr")
    parse_layers(cfg.zo_fo_layers or "")


def _seed(base: int, step: int, query: int, index: int) -> int:
    return (int(base) * 1_000_003 + step * 10_007 + query * 101 + index * 7_919 + 17) % (2**62)


# byte value -> its 8 bits as +-1 (bit j of byte b is entry j): Rademacher entries from 64 random bits per draw
_SIGNS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).float().mul_(2).sub_(1)


def rademacher(shape, generator: torch.Generator) -> torch.Tensor:
    """+-1 entries with probability 1/2 each (E[z z^T] = I, as for N(0, 1)), fp32, from 1 int64 draw per 64."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), dtype=torch.int64, generator=generator)
    z = torch.nn.functional.embedding(words.view(torch.uint8).long(), _SIGNS).view(-1)
    return z[:n].view(shape) if z.numel() != n else z.view(shape)


class Directions:
    """Seeded directions z over a list of named tensors, with optional fixed sparsity masks."""

    def __init__(self, names: list[str], params: list[torch.Tensor], seed: int, sparsity: float = 1.0,
                 sparse_mode: str = "magnitude", distribution: str = "gaussian"):
        self.names, self.params, self.seed = names, params, int(seed)
        self.distribution = distribution
        self.masks: list[torch.Tensor | None] = [None] * len(params)
        if sparsity < 1.0:
            for i, p in enumerate(params):
                k = max(1, round(sparsity * p.numel()))
                if sparse_mode == "magnitude":
                    score = p.detach().abs().flatten().float()
                else:
                    g = torch.Generator().manual_seed(_seed(seed, -1, 0, i))
                    score = torch.rand(p.numel(), generator=g)
                idx = torch.topk(score, k, largest=False).indices  # exactly k entries
                m = torch.zeros(p.numel(), dtype=torch.bool)
                m[idx] = True
                self.masks[i] = m.view(p.shape).to(p.device)

    def z(self, i: int, step: int, query: int) -> torch.Tensor:
        """Direction of tensor i for (step, query): N(0, 1) or +-1 entries (zero outside the sparsity mask), fp32."""
        p = self.params[i]
        z = self._draw(i, step, query, torch.Generator(), torch.empty(p.shape, dtype=torch.float32))
        if p.device.type != "cpu":
            z = z.to(p.device)
        if self.masks[i] is not None:
            z.mul_(self.masks[i])
        return z

    def _draw(self, i: int, step: int, query: int, g: torch.Generator, out: torch.Tensor) -> torch.Tensor:
        """The unmasked fp32 direction of tensor i for (step, query), drawn on the CPU generator g into `out`."""
        g.manual_seed(_seed(self.seed, step, query, i))
        if self.distribution == "rademacher":
            return out.copy_(rademacher(tuple(out.shape), g))
        return torch.randn(out.shape, generator=g, out=out)

    def accumulate(self, i: int, coeffs: list[tuple[int, int, float]], acc: torch.Tensor) -> torch.Tensor:
        """acc += sum_j c_j z_i(step_j, query_j) on the CPU, in acc's dtype: the same values as adding each z(i, ...)
        in turn (fp32 draws, widened exactly), with one generator and the draw buffers reused across the terms
        (a replay's inner loop, where a fresh generator and tensor per term cost as much as the draws)."""
        p = self.params[i]
        g = torch.Generator()
        buf = torch.empty(p.shape, dtype=torch.float32)
        wide = buf if acc.dtype == torch.float32 else torch.empty(p.shape, dtype=acc.dtype)
        mask = None if self.masks[i] is None else self.masks[i].cpu()
        for step, query, c in coeffs:
            self._draw(i, step, query, g, buf)
            if mask is not None:
                buf.mul_(mask)
            if wide is not buf:
                wide.copy_(buf)  # a separate widening pass: faster than a mixed-dtype add, the same values
            acc.add_(wide, alpha=c)
        return acc

    def combo(self, i: int, coeffs: list[tuple[int, int, float]]) -> torch.Tensor:
        """sum_j c_j z_i(step_j, query_j) for coeffs [(step, query, c)]."""
        out = None
        for step, query, c in coeffs:
            z = self.z(i, step, query)
            out = z.mul_(c) if out is None else out.add_(z, alpha=c)
        return out


class Perturber:
    """Evaluates the model at theta + sum_j c_j z_j without ever writing theta (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], dirs: Directions):
        self.params, self.dirs = params, dirs
        self.index = {id(p): i for i, p in enumerate(params)}
        owners: dict[int, list[torch.nn.Module]] = {id(p): [] for p in params}
        for mod in model.modules() if model is not None else ():
            for p in mod._parameters.values():
                if p is not None and id(p) in owners:
                    owners[id(p)].append(mod)
        self.hooked = {id(p) for p in params
                       if owners[id(p)] and all(not any(True for _ in m.children()) for m in owners[id(p)])}
        self.active: dict[int, list] | None = None  # param index -> coeffs while evaluating
        self._handles = []
        for mod in {id(m): m for ms in owners.values() for m in ms}.values():
            if any(id(p) in self.hooked for p in mod._parameters.values() if p is not None):
                self._handles.append(mod.register_forward_pre_hook(self._pre))
                self._handles.append(mod.register_forward_hook(self._post))
        self._swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []

    def _pre(self, mod, args):
        if self.active is None:
            return
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) not in self.hooked:
                continue
            i = self.index[id(p)]
            coeffs = self.active.get(i)
            if not coeffs:
                continue
            pert = self.dirs.combo(i, coeffs).to(p.dtype).add_(p.detach())
            mod._parameters[name] = pert  # a plain tensor in the slot for this forward only
            self._swapped.append((mod, name, p))

    def _post(self, mod, args, out):
        self._restore(mod)

    def _restore(self, only=None):
        keep = []
        for mod, name, p in self._swapped:
            if only is None or mod is only:
                mod._parameters[name] = p
            else:
                keep.append((mod, name, p))
        self._swapped = keep

    @contextmanager
    def at(self, coeffs: list[tuple[int, int, float]], subset: set[int] | None = None):
        """Within the block, the model computes at theta + sum c z (over `subset` of the tensors, all if None)."""
        idx = [i for i in range(len(self.params)) if subset is None or i in subset]
        self.active = {i: coeffs for i in idx if id(self.params[i]) in self.hooked}
        backups = []
        try:
            with torch.no_grad():
                for i in idx:
                    p = self.params[i]
                    if id(p) in self.hooked:
                        continue
                    backups.append((p, p.detach().clone()))
                    p.add_(self.dirs.combo(i, coeffs).to(p.dtype))
            yield
        finally:
            self.active = None
            self._restore()
            with torch.no_grad():
                for p, b in backups:
                    p.copy_(b)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _blocks(model, names: list[str], mode: str) -> list[list[int]]:
    """Tensor indices grouped into blocks for block-wise ZO."""
    if mode == "none":
        return [list(range(len(names)))]
    arch = getattr(getattr(model, "config", None), "model_type", None)
    if mode in ("layer", "sublayer") and _FAMILY.get(arch) is None:
        raise ConfigError(f"block-wise ZO mode {mode!r} knows the layer names of Llama, Mistral, Qwen2 and Gemma3, "
                          f"not {arch}; use zo_block 'linear' or 'none'", field="zo_block")
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        module = n.rsplit(".", 1)[0]
        m = _LAYER.search(n)
        if mode == "linear" or m is None:
            key = module  # outside the decoder layers (embeddings, final norm, head): one block per module
        elif mode == "layer":
            key = f"layer {m.group(1)}"
        else:
            sub = n[m.end():].split(".", 1)[0]
            half = _HALVES[_FAMILY[arch]].get(sub)
            if half is None:
                raise ConfigError(f"block-wise ZO: {n} is in no known half (attention or MLP) of a {arch} layer",
                                  field="zo_block")
            key = f"layer {m.group(1)} {half}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class ZeroOrder(StepRule):
    """Shared machinery: directions, perturbation, blocks, hybrid first-order layers, the step counter."""

    needs_grad = False

    def __init__(self, params, config, model=None):
        super().__init__(params, config, model)
        cfg = config
        check_options(cfg)
        self.lr = float(cfg.lr)
        self.eps, self.q, self.one_sided = float(cfg.zo_eps), int(cfg.zo_queries), bool(cfg.zo_one_sided)
        sparsity, sparse_mode, block = float(cfg.zo_sparsity), cfg.zo_sparse_mode, cfg.zo_block
        names = self._names(model)
        fo_layers = parse_layers(cfg.zo_fo_layers or "")
        self.fo: list[torch.nn.Parameter] = []
        if fo_layers:
            present = sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})
            missing = [i for i in fo_layers if i not in present]
            if missing:
                raise ConfigError(f"zo_fo_layers names layer(s) {missing} but the trainable tensors are in layers "
                                  f"{present[0]}..{present[-1]}" if present else
                                  f"zo_fo_layers names layers {missing} but no trainable tensor is in a decoder layer",
                                  field="zo_fo_layers")
            keep = []
            for p, n in zip(self.params, names):
                m = _LAYER.search(n)
                (self.fo if m and int(m.group(1)) in fo_layers else keep).append((p, n))
            self.fo = [p for p, _ in self.fo]
            self.params, names = [p for p, _ in keep], [n for _, n in keep]
            if not self.params:
                raise ConfigError("zo_fo_layers covers every trainable tensor: nothing is left for zeroth order",
                                  field="zo_fo_layers")
            self.fo_lr = float(cfg.zo_fo_lr or self.lr)
        for p in self.params:
            p.requires_grad_(False)  # no autograd graph for the ZO tensors
        self.names = names
        self.dirs = Directions(names, self.params, int(cfg.seed), sparsity, sparse_mode, cfg.zo_distribution)
        self.perturb = Perturber(model, self.params, self.dirs)
        self.blocks = _blocks(model, names, block)
        self.t = 0

    def _names(self, model) -> list[str]:
        if model is None:
            return [f"param{i}" for i in range(len(self.params))]
        by_id = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), n)
        return [by_id.get(id(p), f"param{i}") for i, p in enumerate(self.params)]

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        if self.fo:  # the first-order rate follows the same schedule
            self.fo_lr = float(self.config.zo_fo_lr or self.config.lr) * lr / float(self.config.lr)

    def subset(self) -> set[int] | None:
        return None if len(self.blocks) == 1 else set(self.blocks[self.t % len(self.blocks)])

    def first_order(self, closure) -> float | None:
        """Hybrid: one backward through the model for the first-order tensors, then plain SGD on them."""
        if not self.fo:
            return None
        for p in self.fo:
            p.grad = None
        loss = closure(backward=True)
        with torch.no_grad():
            for p in self.fo:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=self.fo_lr)
                    p.grad = None
        return loss

    def key(self) -> int:
        """The key that seeds this step's directions: the step counter (CandidateSeedZO draws it instead)."""
        return self.t

    def estimate(self, closure) -> tuple[list[tuple[int, int, float]], float]:
        """[(key, query, g_j / q)] and the loss at theta (mean of the two points, or L(theta) one-sided)."""
        sub = self.subset()
        key = self.key()
        coeffs, losses = [], []
        with torch.no_grad():
            l0 = closure(backward=False) if self.one_sided else None
            for j in range(self.q):
                with self.perturb.at([(key, j, self.eps)], sub):
                    lp = closure(backward=False)
                if self.one_sided:
                    g = (lp - l0) / self.eps
                    losses.append(l0)
                else:
                    with self.perturb.at([(key, j, -self.eps)], sub):
                        lm = closure(backward=False)
                    g = (lp - lm) / (2 * self.eps)
                    losses.append((lp + lm) / 2)
                coeffs.append((key, j, g / self.q))
        return coeffs, sum(losses) / len(losses)

    def grad_estimate(self, i: int, coeffs) -> torch.Tensor:
        return self.dirs.combo(i, coeffs)

    def update(self, coeffs, sub) -> None:
        raise NotImplementedError

    def step(self, closure) -> float:
        fo_loss = self.first_order(closure)
        coeffs, loss = self.estimate(closure)
        if all(math.isfinite(c) for _, _, c in coeffs):
            self.update(coeffs, self.subset())
        else:
            loss = math.nan  # the loop stops on a non-finite loss before anything is saved
        self.t += 1
        return loss if fo_loss is None else fo_loss

    def _foreach(self, sub):
        for i, p in enumerate(self.params):
            if sub is None or i in sub:
                yield i, p

    def state_dict(self) -> dict:
        """The step counter (it seeds the directions) and the sparsity masks (chosen once, from the weights at
        the start of training: a resumed run must not re-choose them from the weights it resumes with)."""
        out: dict = {"t": self.t}
        if any(m is not None for m in self.dirs.masks):
            out["masks"] = [m if m is not None else torch.zeros(0, dtype=torch.bool) for m in self.dirs.masks]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        if "masks" in state:
            self.dirs.masks = [m.to(p.device) if m.numel() else None for m, p in zip(state["masks"], self.params)]


@register_optimizer("zo-sgd")
class ZOSGD(ZeroOrder):
    """theta -= lr * sum_j (g_j / q) z_j."""

    def update(self, coeffs, sub):
        with torch.no_grad():
            for i, p in self._foreach(sub):
                p.add_(self.grad_estimate(i, coeffs).to(p.dtype), alpha=-self.lr)


class CandidateSeedZO(ZOSGD):
    """zo-sgd whose direction each step is one of K candidate seeds (FedKSeed): step t draws a candidate index
    from a private generator seeded by `pick_seed` (uniformly, or with probabilities `probs`), moves theta by
    -lr g z(candidates[index]) and records (index, g) in `picks`, so the K per-seed sums of g describe the local
    update exactly. One query, no blocks, no sparsity and no first-order layers: the update must be replayable
    from the seeds alone."""

    def __init__(self, params, config, model=None, *, candidates: list[int], probs: list[float] | None = None,
                 pick_seed: int = 0):
        super().__init__(params, config, model)
        if self.q != 1 or self.fo or len(self.blocks) != 1 or any(m is not None for m in self.dirs.masks):
            raise ConfigError("candidate-seed ZO takes one query per step on every tensor (zo_queries 1, no "
                              "zo_block, zo_sparsity or zo_fo_layers)", field="optimizer")
        if not candidates:
            raise ConfigError("candidate-seed ZO needs at least one candidate seed", field="seeds")
        self.candidates = [int(s) for s in candidates]
        self.probs = None if probs is None else torch.as_tensor(probs, dtype=torch.float64)
        if self.probs is not None and self.probs.shape != (len(self.candidates),):
            raise ConfigError(f"{len(self.candidates)} candidate seeds but {self.probs.numel()} probabilities",
                              field="seeds")
        self.pick_gen = torch.Generator().manual_seed(int(pick_seed))
        self.picks: list[tuple[int, float]] = []
        self._index = 0

    def key(self) -> int:
        return self.candidates[self._index]

    def estimate(self, closure):
        if self.probs is None:
            self._index = int(torch.randint(len(self.candidates), (1,), generator=self.pick_gen))
        else:
            self._index = int(torch.multinomial(self.probs, 1, generator=self.pick_gen))
        coeffs, loss = super().estimate(closure)
        self.picks.append((self._index, float(coeffs[0][2])))
        return coeffs, loss


@register_optimizer("zo-sgd-sign")
class ZOSGDSign(ZeroOrder):
    """theta -= lr * sign(estimate), element-wise."""

    def update(self, coeffs, sub):
        with torch.no_grad():
            for i, p in self._foreach(sub):
                p.add_(torch.sign(self.grad_estimate(i, coeffs)).to(p.dtype), alpha=-self.lr)


@register_optimizer("zo-sgd-mmt")
class ZOSGDMomentum(ZeroOrder):
    """m = mu m + estimate; theta -= lr m (mu = zo_momentum; a full-size buffer per tensor)."""

    def __init__(self, params, config, model=None):
        super().__init__(params, config, model)
        self.mu = float(config.zo_momentum)
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    def update(self, coeffs, sub):
        with torch.no_grad():
            for i, p in self._foreach(sub):
                self.m[i].mul_(self.mu).add_(self.grad_estimate(i, coeffs))
                p.add_(self.m[i].to(p.dtype), alpha=-self.lr)

    def state_dict(self):
        return {**super().state_dict(), "m": list(self.m)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.m = [m.to(p.device) for m, p in zip(state["m"], self.params)]


@register_optimizer("zo-adam")
class ZOAdam(ZeroOrder):
    """Adam (beta1, beta2, eps 1e-8, bias-corrected) on the ZO estimate; two full-size moments per tensor."""

    def __init__(self, params, config, model=None):
        super().__init__(params, config, model)
        self.b1, self.b2 = float(config.beta1), float(config.beta2)
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.k = [0] * len(self.params)  # updates each tensor received (block-wise updates some per step)

    def update(self, coeffs, sub):
        with torch.no_grad():
            for i, p in self._foreach(sub):
                g = self.grad_estimate(i, coeffs)
                self.k[i] += 1
                self.m[i].mul_(self.b1).add_(g, alpha=1 - self.b1)
                self.v[i].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                mh = self.m[i] / (1 - self.b1 ** self.k[i])
                vh = self.v[i] / (1 - self.b2 ** self.k[i])
                p.add_((mh / (vh.sqrt() + 1e-8)).to(p.dtype), alpha=-self.lr)

    def state_dict(self):
        return {**super().state_dict(), "m": list(self.m), "v": list(self.v), "k": list(self.k)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.m = [m.to(p.device) for m, p in zip(state["m"], self.params)]
        self.v = [v.to(p.device) for v, p in zip(state["v"], self.params)]
        self.k = [int(k) for k in state["k"]]


@register_optimizer("zo-sgd-cons")
class ZOSGDConservative(ZeroOrder):
    """Evaluate theta, theta - lr * estimate and theta + lr * estimate; move to the best of the three."""

    def step(self, closure) -> float:
        fo_loss = self.first_order(closure)
        coeffs, _ = self.estimate(closure)
        sub = self.subset()
        if not all(math.isfinite(c) for _, _, c in coeffs):
            self.t += 1
            return math.nan
        with torch.no_grad():
            l0 = closure(backward=False)
            step = [(s, j, -self.lr * c) for s, j, c in coeffs]
            with self.perturb.at(step, sub):
                l_minus = closure(backward=False)
            with self.perturb.at([(s, j, -c) for s, j, c in step], sub):
                l_plus = closure(backward=False)
        best = min((l0, 0.0), (l_minus, -1.0), (l_plus, 1.0), key=lambda x: x[0])
        self.last_choice = best[1]
        if best[1] != 0.0:
            with torch.no_grad():
                for i, p in self._foreach(sub):
                    p.add_(self.grad_estimate(i, coeffs).to(p.dtype), alpha=best[1] * self.lr)
        self.t += 1
        return best[0] if fo_loss is None else fo_loss

    def update(self, coeffs, sub):  # pragma: no cover - step() is overridden
        raise NotImplementedError


@register_optimizer("forward-grad")
class ForwardGrad(ZeroOrder):
    """The exact directional derivative d = grad(L) . z by forward-mode AD (torch.func.jvp); theta -= lr d z."""

    def estimate(self, closure):
        from torch.func import jvp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sub = self.subset()
        idx = [i for i in range(len(self.params)) if sub is None or i in sub]
        coeffs, losses = [], []
        for j in range(self.q):
            primals = tuple(self.params[i].detach() for i in idx)
            tangents = tuple(self.dirs.z(i, self.t, j).to(self.params[i].dtype) for i in idx)
            names = [self.names[i] for i in idx]

            def f(*ps, names=names):
                return closure.functional(dict(zip(names, ps)))

            try:
                # flash / memory-efficient attention kernels have no forward-mode derivative: use the math one
                with sdpa_kernel(SDPBackend.MATH):
                    loss, d = jvp(f, primals, tangents)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                raise ConfigError(f"forward-grad needs a scheme differentiable through torch.func (jvp): {e}",
                                  field="optimizer") from e
            coeffs.append((self.t, j, float(d) / self.q))
            losses.append(float(loss))
        return coeffs, sum(losses) / len(losses)

    def update(self, coeffs, sub):
        with torch.no_grad():
            for i, p in self._foreach(sub):
                p.add_(self.grad_estimate(i, coeffs).to(p.dtype), alpha=-self.lr)
