"""Every knob of post-training quantization (GPTQ / RTN, bit plans, calibration), with its default (only here).

`patchlm quant` generates its options from these fields; the library functions take a QuantConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchlm.errors import ConfigError
from patchlm.typed import check_fields

BITS = (2, 3, 4, 8)          # what is implemented; 16 in a plan means "keep this module as it is"
KEEP = 16
METHODS = ("gptq", "rtn")
KERNELS = ("auto", "dequant")


@dataclass
class QuantConfig:
    """How a model is quantized: method, bits or a plan, groups, GPTQ's damping and order, calibration."""

    method: str = field(default="gptq", metadata={"help": "gptq (Hessian-aware, needs calibration) | rtn"})
    bits: int | None = field(default=None, metadata={
        "help": "uniform bits for every linear module and expert: 2, 3, 4 or 8 (or give --plan)"})
    plan: str | None = field(default=None, metadata={
        "help": "bit plan, rules 'SELECTOR=BITS[/GROUP]' joined by ';', later rules win, e.g. "
                "'all=2;attn=4;first:2=8;type:down_proj=4;expert:1.0=3;re:.*v_proj=8' (16 keeps a module); "
                "or 'heuristic:NAME@AVG' (attn, mlp, first-k, down-first, frequency, outlier, predictor, "
                "random, uniform); or @FILE with the rules"})
    group_size: int = field(default=128, metadata={
        "help": "input columns per scale/zero group (0: one group per output row); must divide every input size"})
    act_order: bool = field(default=False, metadata={
        "help": "GPTQ: quantize columns in order of decreasing Hessian diagonal (g_idx records the groups)"})
    damp: float = field(default=0.01, metadata={
        "help": "GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean"})
    damp_retries: int = field(default=6, metadata={
        "help": "GPTQ: times the dampening is multiplied by 10 when the Cholesky factorization fails"})
    block_size: int = field(default=128, metadata={"help": "GPTQ: columns per lazy-update block"})
    calib: str = field(default="news_corpus", metadata={"help": "calibration task (its train split text)"})
    calib_samples: int = field(default=64, metadata={"help": "calibration windows"})
    calib_length: int = field(default=256, metadata={"help": "tokens per calibration window"})
    expert_min_tokens: int = field(default=8, metadata={
        "help": "MoE: an expert routed fewer calibration tokens than this is quantized by RTN (reported)"})
    low_bits: int = field(default=2, metadata={"help": "heuristic plans: the bits every module starts at"})
    high_bits: int = field(default=4, metadata={"help": "heuristic plans: the bits the chosen modules get"})
    predictor_steps: int = field(default=150, metadata={
        "help": "predictor scorer: training steps of each block's cos(in, out) predictor"})
    kernel: str = field(default="auto", metadata={
        "help": "how the loaded patch runs: auto (4-bit units with a group of 32/64/128/256 and no act-order through "
                "torch's packed int4 CPU matmul, in bfloat16; the rest dequantized on the fly) | dequant (every "
                "unit dequantized to float32 on the fly: the float32 reference, slower)"})
    seed: int = field(default=0, metadata={"help": "seed of calibration sampling, the random plan and the predictor"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per forward"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choices: {', '.join(METHODS)}",
                              field="method")
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown kernel {self.kernel!r}; choices: {', '.join(KERNELS)}", field="kernel")
        if (self.bits is None) == (self.plan is None):
            raise ConfigError("give either bits (uniform) or a plan, exactly one of them", field="bits")
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"bits {self.bits} is not implemented; choose one of {', '.join(map(str, BITS))}",
                              field="bits")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0: one group per row), got {self.group_size}",
                              field="group_size")
        if self.damp <= 0:
            raise ConfigError(f"damp must be positive, got {self.damp}", field="damp")
        for name in ("block_size", "calib_samples", "batch_size", "predictor_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        for name in ("damp_retries", "expert_min_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", field=name)
        if self.calib_length < 2:
            raise ConfigError(f"calib_length must be at least 2 tokens, got {self.calib_length}",
                              field="calib_length")
        for name in ("low_bits", "high_bits"):
            if getattr(self, name) not in (*BITS, KEEP):
                raise ConfigError(f"{name} {getattr(self, name)} is not implemented; choose one of "
                                  f"{', '.join(map(str, (*BITS, KEEP)))}", field=name)
        if self.low_bits >= self.high_bits:
            raise ConfigError(f"low_bits ({self.low_bits}) must be below high_bits ({self.high_bits})",
                              field="low_bits")
