"""Newton step rule: per-block Newton directions from the empirical Fisher or the exact Hessian, with pluggable
solvers (classical here; the Q-Newton scheduler in patchlm.qnewton routes each solve to a modelled quantum solver).

One step: the closure's gradient g (backward); per block of parameters (a tensor, a row of a matrix, a module's
tensors, or every trainable tensor) the matrix H: the empirical Fisher mean_i g_i g_i^T over the step's examples
(per-example gradients by torch.func.vmap(grad) over `closure.example_loss` where the loss traces under vmap, as
a classifier head's does; else one backward per example over `closure.examples()`, as for a LoRA on a causal LM,
whose loss masks labelled positions with a data-dependent boolean index vmap cannot batch) or the exact Hessian
of the block (torch.func.hessian of `closure.functional`); optionally sparsified to d entries per row (the top-d
magnitudes of each row, intersected with the transpose's so the matrix stays symmetric, the diagonal always kept);
regularised H + lambda max|H| I
(Q-Newton's regularisation; the official code adds 1e-6 to max|H|, we do not); solved H x = g by the configured
solver; then theta -= lr * x (momentum as SGD's, weight decay as an L2 term in g and H). Blocks larger than
newton_max_block take a plain first-order step (one log line names them) or, with newton_fallback off, fail
before training. A matrix still singular after regularisation stops training with its condition number and
the lambda that would fix it.

Timing: every step records its wall time and, per solve, the solver's record (route, measured solve seconds,
modelled seconds, condition numbers); `metrics()` sums them (measured = wall time minus the solves a solver
routed away from this machine; modelled = measured + their modelled time), so the trainer logs them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean
from patchlm.train.optim import StepRule, register_optimizer

log = logging.getLogger(__name__)

MATRICES = ("fisher", "hessian")
BLOCKS = ("tensor", "row", "module", "all")
CLASSICAL_COSTS = ("measured", "modelled")
# Seconds per quantum gate, by name (newton_gate_time takes a name or a number of seconds).
# today: ~100 ns, the order of a two-qubit gate on today's superconducting chips (error-correction overhead, which
# a QLSA needs and which makes a logical gate far slower, is ignored: a generous figure);
# paper: 1e-18 s, attosecond gates, the optimistic future the Q-Newton paper hypothesises ("possibly realized by
# attoseconds physics", its abstract).
GATE_TIMES = {"today": 1e-7, "nanosecond": 1e-9, "picosecond": 1e-12, "femtosecond": 1e-15, "paper": 1e-18}


def gate_seconds(value: str | float) -> float:
    """newton_gate_time as seconds: a preset name (GATE_TIMES) or a positive number."""
    text = str(value).strip()
    if text in GATE_TIMES:
        return GATE_TIMES[text]
    try:
        sec = float(text)
    except ValueError:
        raise ConfigError(f"newton_gate_time must be seconds per gate (a number such as 1e-9) or a preset "
                          f"({', '.join(f'{k} = {v:g} s' for k, v in GATE_TIMES.items())}); got {value!r}",
                          field="newton_gate_time") from None
    if not math.isfinite(sec) or sec <= 0:
        raise ConfigError(f"newton_gate_time must be a positive number of seconds, got {value!r}",
                          field="newton_gate_time")
    return sec


def check_options(cfg) -> None:
    """Range checks of the newton_* fields of a TrainConfig (before any model is loaded)."""
    for name, choices in (("newton_matrix", MATRICES), ("newton_block", BLOCKS),
                          ("newton_classical", CLASSICAL_COSTS)):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}; choices: {', '.join(choices)}", field=name)
    for name in ("newton_max_block", "newton_kappa_exact", "newton_kappa_every"):
        if int(getattr(cfg, name)) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}", field=name)
    if int(cfg.newton_sparsity) < 0:
        raise ConfigError(f"newton_sparsity is d, the entries kept per row (0: dense); got {cfg.newton_sparsity}",
                          field="newton_sparsity")
    if float(cfg.newton_lambda) < 0:
        raise ConfigError(f"newton_lambda must not be negative, got {cfg.newton_lambda}", field="newton_lambda")
    if not float(cfg.newton_max_step) >= 0 or not math.isfinite(float(cfg.newton_max_step)):
        raise ConfigError(f"newton_max_step is a norm (0: off), got {cfg.newton_max_step}", field="newton_max_step")
    eps = float(cfg.newton_epsilon)
    if not 0 < eps < 1:
        raise ConfigError(f"newton_epsilon is the quantum solver's error tolerance, in (0, 1); got {eps}",
                          field="newton_epsilon")
    if not float(cfg.newton_kappa_limit) > 1:
        raise ConfigError(f"newton_kappa_limit must be above 1, got {cfg.newton_kappa_limit}",
                          field="newton_kappa_limit")
    if cfg.newton_fallback_lr is not None and not cfg.newton_fallback_lr > 0:
        raise ConfigError(f"newton_fallback_lr must be positive, got {cfg.newton_fallback_lr}",
                          field="newton_fallback_lr")
    gate_seconds(cfg.newton_gate_time)
    if cfg.optimizer == "newton":
        solver_class(cfg.newton_solver)


# ------------------------------------------------------------------ solvers
@dataclass
class LinearSystem:
    """One block's system (H + shift I) x = g, as a solver receives it (float64, H symmetric)."""

    name: str            # the block's name (a parameter name, with [row] for row blocks)
    matrix: torch.Tensor  # H after sparsification, before regularisation [N, N]
    shift: float          # lambda * max|H|, added to the diagonal
    grad: torch.Tensor    # g [N]
    d: int                # non-zeros per row of the solved matrix (its sparsity, N when dense)
    step: int             # the rule's step counter
    lam: float            # newton_lambda (for the singular-matrix message)
    factor: torch.Tensor | None = None  # [B, N] with matrix = factor^T factor + diag_shift I (a dense Fisher), or None
    diag_shift: float = 0.0             # weight decay's share of the diagonal in that identity

    @property
    def n(self) -> int:
        return int(self.grad.numel())

    def regularized(self) -> torch.Tensor:
        return self.matrix + self.shift * torch.eye(self.n, dtype=self.matrix.dtype, device=self.matrix.device)


def lambda_to_fix(matrix: torch.Tensor, scale: float, kappa_limit: float) -> float:
    """The smallest lambda with cond(H + lambda scale I) <= kappa_limit, from H's eigenvalues (H symmetric)."""
    e = torch.linalg.eigvalsh(matrix.double())
    lo, hi = float(e.min()), float(e.abs().max())
    shift = max(0.0, (hi - kappa_limit * lo) / (kappa_limit - 1))
    return shift / scale if scale > 0 else math.inf


def classical_solve(system: LinearSystem, kappa_limit: float) -> tuple[torch.Tensor, float]:
    """x with (H + shift I) x = g by an LU factorisation, and the seconds it took. A pivot ratio beyond
    kappa_limit (an exactly or numerically singular matrix) is checked with the exact condition number and
    stops training with it and the lambda that would bring it under the limit."""
    a = system.regularized()
    t0 = time.perf_counter()
    lu, piv, info = torch.linalg.lu_factor_ex(a)
    diag = lu.diagonal().abs()
    suspect = int(info) != 0 or not bool(torch.isfinite(diag).all()) or \
        float(diag.min()) * kappa_limit < float(diag.max())
    x = None if suspect else torch.linalg.lu_solve(lu, piv, system.grad.unsqueeze(-1)).squeeze(-1)
    seconds = time.perf_counter() - t0
    if suspect:
        kappa = float(torch.linalg.cond(a)) if bool(torch.isfinite(a).all()) else math.inf
        if not math.isfinite(kappa) or kappa > kappa_limit:
            raise singular_error(system, kappa, kappa_limit)
        x = torch.linalg.solve(a, system.grad)
    return x, seconds


def singular_error(system: LinearSystem, kappa: float, kappa_limit: float) -> ConfigError:
    scale = float(system.matrix.abs().max())
    fix = lambda_to_fix(system.matrix, scale, kappa_limit) if scale > 0 else math.inf
    hint = (f"newton_lambda >= {fix * 1.01:.3g} would bring it under newton_kappa_limit {kappa_limit:g}"
            if math.isfinite(fix) else "the matrix is zero: no lambda fixes it (is the loss constant?)")
    return ConfigError(f"the Newton matrix of block {system.name} (N={system.n}) is singular after regularisation "
                       f"with newton_lambda {system.lam:g}: condition number {kappa:.3g}; {hint}",
                       field="newton_lambda")


class Solver:
    """Solves a block's system and says what it cost: solve(system) -> (x, record). A record holds at least
    route ('classical' or another route), n, d, solve_s (measured seconds of the solve done here), modelled_s
    (seconds the route is modelled to take; the measured ones for a classical solve) and overhead_s (classical
    work the solver did to choose, e.g. condition numbers)."""

    def __init__(self, config):
        self.config = config
        self.kappa_limit = float(config.newton_kappa_limit)

    def solve(self, system: LinearSystem) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_SOLVERS: dict[str, type[Solver]] = {}
SOLVER_GROUP = "patchlm.newton_solvers"  # entry-point group: packages above the engine add solvers here


def register_solver(name: str):
    """Class decorator: make a Solver available as newton_solver `name`."""

    def deco(cls: type[Solver]) -> type[Solver]:
        _SOLVERS[name] = cls
        return cls

    return deco


def solver_class(name: str) -> type[Solver]:
    """The solver registered as `name`, loading the entry points of SOLVER_GROUP when it is not known yet."""
    if name not in _SOLVERS:
        for ep in entry_points(group=SOLVER_GROUP):
            if ep.name == name:
                _SOLVERS[name] = ep.load()
    if name not in _SOLVERS:
        known = set(_SOLVERS) | {ep.name for ep in entry_points(group=SOLVER_GROUP)}
        raise UnknownNameError(f"unknown newton_solver {name!r}; {did_you_mean(name, known)}")
    return _SOLVERS[name]


@register_solver("classical")
class ClassicalSolver(Solver):
    """Every solve by LU on this machine (classical Newton)."""

    def solve(self, system):
        x, sec = classical_solve(system, self.kappa_limit)
        return x, {"route": "classical", "n": system.n, "d": system.d, "solve_s": sec, "modelled_s": sec,
                   "overhead_s": 0.0}


# ------------------------------------------------------------------ blocks and matrices
def sparsify(h: torch.Tensor, d: int) -> torch.Tensor:
    """Keep at most d entries per row, symmetric: entry (i, j) stays when it is among the d largest magnitudes of
    row i and of row j (the diagonal always stays and counts as one of the d)."""
    n = h.shape[0]
    if d >= n:
        return h
    score = h.abs().clone()
    score.fill_diagonal_(math.inf)
    top = torch.topk(score, d, dim=1).indices
    keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, top, True)
    return h * (keep & keep.T)


def row_nnz(h: torch.Tensor) -> int:
    return int((h != 0).sum(1).max()) if h.numel() else 0


@dataclass
class Block:
    """Part of the trainable parameters solved together: entries (param index, row or None for the whole)."""

    name: str
    entries: list[tuple[int, int | None]]
    n: int


def _names(model, params) -> list[str]:
    if model is None:
        return [f"param{i}" for i in range(len(params))]
    by_id = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), n)
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]


def make_blocks(names: list[str], params: list[torch.Tensor], mode: str) -> list[Block]:
    """The blocks of newton_block `mode` (tensor | row | module | all)."""
    if mode == "all":
        return [Block("all", [(i, None) for i in range(len(params))], sum(p.numel() for p in params))]
    if mode == "module":
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(i)
        return [Block(k, [(i, None) for i in v], sum(params[i].numel() for i in v)) for k, v in groups.items()]
    out = []
    for i, (n, p) in enumerate(zip(names, params)):
        if mode == "row" and p.dim() >= 2:
            out += [Block(f"{n}[{r}]", [(i, r)], p[r].numel()) for r in range(p.shape[0])]
        else:
            out.append(Block(n, [(i, None)], p.numel()))
    return out


def gather_batched(tensors: list[torch.Tensor], block: Block) -> torch.Tensor:
    """The block's entries of per-example tensors [B, *shape] as one [B, N] matrix."""
    parts = []
    for i, r in block.entries:
        t = tensors[i]
        parts.append(t.reshape(t.shape[0], -1) if r is None else t[:, r].reshape(t.shape[0], -1))
    return torch.cat(parts, dim=1)


def gather(tensors: list[torch.Tensor], block: Block) -> torch.Tensor:
    """The block's entries of per-parameter tensors (each shaped like its parameter, or with a leading batch
    dimension when batched), flattened and concatenated along the last dimension."""
    parts = []
    for i, r in block.entries:
        t = tensors[i]
        parts.append(t.reshape(-1) if r is None else t[r].reshape(-1))
    return torch.cat(parts)


@register_optimizer("newton")
class Newton(StepRule):
    """Per-block Newton steps theta -= lr (H + lambda max|H| I)^-1 g; see the module docstring."""

    def __init__(self, params, config, model=None):
        super().__init__(params, config, model)
        check_options(config)
        cfg = config
        self.lr = float(cfg.lr)
        self.names = _names(model, self.params)
        blocks = make_blocks(self.names, self.params, cfg.newton_block)
        limit = int(cfg.newton_max_block)
        self.blocks = [b for b in blocks if b.n <= limit]
        self.fallback = [b for b in blocks if b.n > limit]
        if self.fallback:
            big = max(self.fallback, key=lambda b: b.n)
            if not cfg.newton_fallback:
                raise ConfigError(f"block {big.name} has {big.n} parameters, above newton_max_block {limit}, and "
                                  f"newton_fallback is off: raise newton_max_block, choose a smaller newton_block "
                                  f"(row), or allow the first-order fallback", field="newton_max_block")
            log.warning("newton: %d block(s) above newton_max_block %d (largest %s, %d parameters) take "
                        "first-order steps", len(self.fallback), limit, big.name, big.n)
        self.d = int(cfg.newton_sparsity)
        if self.d and self.blocks and self.d > max(b.n for b in self.blocks):
            raise ConfigError(f"newton_sparsity d={self.d} exceeds N={max(b.n for b in self.blocks)}, the size of "
                              "the largest Newton block: d is at most N", field="newton_sparsity")
        self.fallback_lr = float(cfg.newton_fallback_lr or cfg.lr)
        self.lam = float(cfg.newton_lambda)
        self.max_step = float(cfg.newton_max_step)
        self.mu, self.wd = float(cfg.momentum), float(cfg.weight_decay)
        self.clip = float(cfg.max_grad_norm or 0.0)
        self.solver = solver_class(cfg.newton_solver)(cfg)
        self.buf: dict[str, torch.Tensor] = {}
        self.vmap: bool | None = None  # per-example gradients by vmap: untried, works, fails
        self.t = 0
        self.totals = {"steps": 0, "solves": 0, "quantum_solves": 0, "measured_s": 0.0, "modelled_s": 0.0,
                       "solve_s": 0.0, "zero_gradient_blocks": 0, "capped_blocks": 0}
        self.last: dict = {}
        self.records: list[dict] = []

    def set_lr(self, lr: float) -> None:
        if self.fallback:
            self.fallback_lr = float(self.config.newton_fallback_lr or self.config.lr) * lr / float(self.config.lr)
        self.lr = lr

    # -- matrices
    def _example_grads(self, closure) -> list[torch.Tensor]:
        """Per-example gradients of every parameter, each [B, *shape]: vmap(grad) over closure.example_loss when the
        loss traces under vmap (tried once; a failure logs one line and the rule keeps the loop), else one backward
        per example."""
        if self.vmap is not False and self.model is not None and hasattr(closure, "example_loss"):
            from torch.func import grad, vmap

            named = {n: p.detach() for n, p in zip(self.names, self.params)}

            def loss(params, example):
                return closure.example_loss(params, {k: v.unsqueeze(0) for k, v in example.items()})

            try:
                per = [vmap(grad(loss), in_dims=(None, 0))(named, b) for b in closure.micro]
                self.vmap = True
                return [torch.cat([d[n] for d in per]) for n in self.names]
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                if self.vmap is True:
                    raise
                self.vmap = False
                log.info("newton: per-example gradients by one backward per example (vmap cannot batch this "
                         "loss: %s)", str(e).splitlines()[0][:160])
        rows: list[list[torch.Tensor]] = [[] for _ in self.params]
        for sub in closure.examples():
            for p in self.params:
                p.grad = None
            sub(backward=True)
            for i, p in enumerate(self.params):
                rows[i].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        return [torch.stack(r) for r in rows]

    def _fisher(self, closure) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per block, mean_i g_i g_i^T and its factor G / sqrt(B) ([B, N], so that the Fisher = factor^T factor)."""
        grads = self._example_grads(closure)
        mats, factors = [], []
        for b in self.blocks:
            g = gather_batched(grads, b).double()
            factor = g / math.sqrt(g.shape[0])
            mats.append(factor.T @ factor)
            factors.append(factor)
        return mats, factors

    def _hessian(self, closure) -> list[torch.Tensor]:
        """The exact Hessian of the step's loss per block (torch.func.hessian of closure.functional)."""
        from torch.func import hessian
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out = []
        for b in self.blocks:
            v0 = gather([p.detach() for p in self.params], b)

            def f(v, b=b):
                named, off = {}, 0
                for i, r in b.entries:
                    p = self.params[i].detach()
                    if r is None:
                        named[self.names[i]] = v[off: off + p.numel()].view(p.shape)
                        off += p.numel()
                    else:
                        k = p[r].numel()
                        row = v[off: off + k].view(p[r].shape).unsqueeze(0)
                        named[self.names[i]] = torch.cat([p[:r], row, p[r + 1:]])
                        off += k
                return closure.functional(named)

            try:
                with sdpa_kernel(SDPBackend.MATH):
                    h = hessian(f)(v0)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                raise ConfigError(f"newton_matrix hessian needs a loss differentiable twice through torch.func: {e}",
                                  field="newton_matrix") from e
            out.append(h.detach().double())
        return out

    # -- the step
    def step(self, closure) -> float:
        t0 = time.perf_counter()
        for p in self.params:
            p.grad = None
        loss = closure(backward=True)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.wd:
            grads = [g + self.wd * p.detach() for g, p in zip(grads, self.params)]
        if self.clip:
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            if norm > self.clip:
                grads = [g * (self.clip / (norm + 1e-6)) for g in grads]
        if not math.isfinite(loss):
            self.t += 1
            return loss
        mats, factors = [], []
        if self.blocks:
            if self.config.newton_matrix == "fisher":
                mats, factors = self._fisher(closure)
            else:
                mats = self._hessian(closure)
        factors = factors or [None] * len(mats)
        for p in self.params:
            p.grad = None
        records = []
        updates: list[tuple[Block, torch.Tensor]] = []
        for b, h, factor in zip(self.blocks, mats, factors):
            h = (h + h.T) / 2
            if self.wd:
                h = h + self.wd * torch.eye(b.n, dtype=h.dtype)
            if self.d and self.d < b.n:
                h = sparsify(h, self.d)
                factor = None  # the sparsified matrix is no longer factor^T factor
            g = gather(grads, b).double()
            if not bool(g.any()):  # e.g. a saturated tanh unit's row: nothing to solve
                updates.append((b, torch.zeros_like(g)))
                self.totals["zero_gradient_blocks"] += 1
                continue
            scale = float(h.abs().max())
            system = LinearSystem(b.name, h, self.lam * scale, g, min(b.n, self.d) if self.d else b.n, self.t,
                                  self.lam, factor, self.wd)
            x, rec = self.solver.solve(system)
            records.append({"block": b.name, **rec})
            updates.append((b, x))
        with torch.no_grad():
            for b, x in updates:
                if self.mu:
                    buf = self.buf.get(b.name)
                    x = x if buf is None else buf.mul_(self.mu).add_(x)
                    self.buf[b.name] = x
                if self.max_step:
                    norm = float(x.norm()) * self.lr
                    if norm > self.max_step:
                        x = x * (self.max_step / norm)
                        self.totals["capped_blocks"] += 1
                self._apply(b, x, self.lr)
            for b in self.fallback:
                self._apply(b, gather(grads, b).double(), self.fallback_lr)
        self.t += 1
        self._account(records, time.perf_counter() - t0)
        return loss

    def _apply(self, block: Block, x: torch.Tensor, lr: float) -> None:
        off = 0
        for i, r in block.entries:
            p = self.params[i]
            target = p.data if r is None else p.data[r]
            k = target.numel()
            target.add_(x[off: off + k].view(target.shape).to(p.dtype), alpha=-lr)
            off += k

    def _account(self, records: list[dict], wall: float) -> None:
        away = [r for r in records if r["route"] != "classical"]
        measured = wall - sum(r["solve_s"] for r in away)
        modelled = measured + sum(r["modelled_s"] for r in away)
        tot = self.totals
        tot["steps"] += 1
        tot["solves"] += len(records)
        tot["quantum_solves"] += len(away)
        tot["measured_s"] += measured
        tot["modelled_s"] += modelled
        tot["solve_s"] += sum(r["solve_s"] for r in records)
        self.records = records
        kb = [r["kappa_before"] for r in records if r.get("kappa_before") is not None]
        ka = [r["kappa_after"] for r in records if r.get("kappa_after") is not None]
        self.last = {"wall_s": wall, "measured_s": measured, "modelled_s": modelled, "solves": len(records),
                     "quantum_solves": len(away), "kappa_before": max(kb) if kb else None,
                     "kappa_after": max(ka) if ka else None}

    def metrics(self) -> dict:
        """Totals since the start (modelled times labelled as such) and the last step's largest condition numbers
        (None where the solver estimates none; inf written as None)."""
        tot = self.totals
        out = {"newton_solves": tot["solves"], "newton_quantum_fraction": tot["quantum_solves"] / max(1, tot["solves"]),
               "newton_measured_s": tot["measured_s"], "newton_modelled_s": tot["modelled_s"],
               "newton_solve_s": tot["solve_s"], "newton_zero_gradient_blocks": tot["zero_gradient_blocks"],
               "newton_capped_blocks": tot["capped_blocks"]}
        for k in ("kappa_before", "kappa_after"):
            v = self.last.get(k)
            out[f"newton_{k}"] = v if v is not None and math.isfinite(v) else None
        methods = sorted({r["kappa_method"] for r in self.records if r.get("kappa_method")})
        out["newton_kappa_method"] = ",".join(methods) or None
        return out

    def state_dict(self) -> dict:
        return {"t": self.t, "totals": dict(self.totals), "buf": dict(self.buf), "solver": self.solver.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.totals = {k: type(v)(state["totals"].get(k, v)) for k, v in self.totals.items()}
        self.buf = {k: v.double() for k, v in state.get("buf", {}).items()}
        self.solver.load_state_dict(state.get("solver", {}))
