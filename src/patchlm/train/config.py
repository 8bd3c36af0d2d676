"""Training hyper-parameters: one typed config that the CLI options and YAML recipes map onto."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from patchlm.errors import ConfigError
from patchlm.typed import check_fields


@dataclass
class TrainConfig:
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="adamw", metadata={
        "help": "step rule: adamw | sgd | zo-sgd | zo-sgd-sign | zo-sgd-mmt | zo-sgd-cons | zo-adam | forward-grad | "
                "newton"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (decoupled for AdamW)"})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    warmup: float = field(default=0.06, metadata={"help": "warm-up: a fraction of steps (<1) or a step count"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant (after warm-up)"})
    zo_eps: float = field(default=1e-3, metadata={"help": "zeroth order: perturbation size eps"})
    zo_queries: int = field(default=1, metadata={"help": "zeroth order: random directions per step (q)"})
    zo_one_sided: bool = field(default=False, metadata={
        "help": "zeroth order: one-sided estimate (L(theta + eps z) - L(theta)) / eps instead of two-sided"})
    zo_momentum: float = field(default=0.9, metadata={"help": "zo-sgd-mmt: momentum"})
    zo_block: str = field(default="none", metadata={
        "help": "block-wise ZO, one block per step: none | layer | sublayer (attention / MLP) | linear"})
    zo_sparsity: float = field(default=1.0, metadata={"help": "sparse ZO: fraction of each tensor perturbed (0, 1]"})
    zo_sparse_mode: str = field(default="magnitude", metadata={
        "help": "sparse ZO: which entries: magnitude (the smallest, as Sparse-MeZO) | random"})
    zo_fo_layers: str = field(default="", metadata={
        "help": "hybrid ZO/FO: decoder layers trained first-order, e.g. 0-3 (empty: none)"})
    zo_fo_lr: float | None = field(default=None, metadata={"help": "hybrid ZO/FO: first-order learning rate [lr]"})
    zo_distribution: str = field(default="gaussian", metadata={
        "help": "zeroth order: direction entries, gaussian (N(0,1), ZO-Bench) | rademacher (+-1, about 4x cheaper "
                "to draw on a CPU)"})
    newton_matrix: str = field(default="fisher", metadata={
        "help": "newton: the matrix per block, fisher (empirical Fisher, mean of per-example gradient outer "
                "products) | hessian (exact, torch.func; small blocks)"})
    newton_block: str = field(default="tensor", metadata={
        "help": "newton: the blocks solved separately, tensor | row (each row of a matrix) | module | all"})
    newton_max_block: int = field(default=4096, metadata={
        "help": "newton: largest block (parameters) given a Newton step; larger ones fall back to first order"})
    newton_fallback: bool = field(default=True, metadata={
        "help": "newton: blocks above newton_max_block take SGD steps (off: refuse to train)"})
    newton_fallback_lr: float | None = field(default=None, metadata={
        "help": "newton: learning rate of the first-order fallback [lr]"})
    newton_lambda: float = field(default=5e-3, metadata={
        "help": "newton: regularisation H + lambda max|H| I (Q-Newton's, lowers the condition number)"})
    newton_max_step: float = field(default=0.0, metadata={
        "help": "newton: largest norm of one block's step lr * x, a trust region (relative damping makes |x| grow as "
                "1/|g| where gradients vanish; 0: off)"})
    newton_sparsity: int = field(default=0, metadata={
        "help": "newton: d, entries kept per row of each matrix, symmetric (the quantum oracle's sparsity; 0: dense)"})
    newton_solver: str = field(default="classical", metadata={
        "help": "newton: classical (every solve by LU here) | qnewton (Q-Newton: each solve routed to the cheaper of "
                "LU and a modelled quantum linear solver)"})
    newton_gate_time: str = field(default="today", metadata={
        "help": "qnewton: seconds per quantum gate, a number or a preset: today (a superconducting two-qubit gate), "
                "nanosecond, picosecond, femtosecond, paper (attosecond gates, the paper's optimistic future)"})
    newton_epsilon: float = field(default=1e-2, metadata={
        "help": "qnewton: error tolerance epsilon of the quantum solver, in (0, 1)"})
    newton_classical: str = field(default="measured", metadata={
        "help": "qnewton: classical cost of a solve, measured (timed here) | modelled (N^3 at a rate timed once)"})
    newton_kappa_exact: int = field(default=1024, metadata={
        "help": "qnewton: blocks up to this size get the exact condition number (eigenvalues), larger ones the "
                "published upper bound (slogdet, clamped by Gershgorin's); a dense Fisher of fewer examples than "
                "parameters gets it exactly from the examples' Gram matrix at any size"})
    newton_kappa_every: int = field(default=1, metadata={
        "help": "qnewton: estimate each block's condition number every k steps (reused in between)"})
    newton_kappa_limit: float = field(default=1e12, metadata={
        "help": "newton: a regularised matrix with a condition number above this is singular: training stops"})
    max_length: int = field(default=256, metadata={"help": "max tokens per example"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0 = only at the end)"})
    eval_limit: int = field(default=200, metadata={"help": "validation examples per evaluation"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and dropout"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (about 2x faster on CPUs with AVX-512 BF16)"})
    objective: str = field(default="auto", metadata={"help": "auto | classification | lm | chat"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_fields(self)
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "eval_limit", "warmup", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; choices: cosine, linear, constant")
        from patchlm.train.optim import optimizers

        if self.optimizer not in optimizers():
            from patchlm.errors import did_you_mean

            raise ConfigError(f"unknown optimizer {self.optimizer!r}; {did_you_mean(self.optimizer, optimizers())}")
        from patchlm.train.zo import check_options

        check_options(self)
        from patchlm.train.newton import check_options as check_newton

        check_newton(self)
        if not (0 <= self.momentum < 1 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("momentum, beta1 and beta2 must be in [0, 1)")
        if self.objective not in ("auto", "classification", "lm", "chat"):
            raise ConfigError(f"unknown objective {self.objective!r}; choices: auto, classification, lm, chat")

    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(sorted(unknown))}; "
                              f"choices: {', '.join(sorted(names))}")
        return cls(**d)
