"""The typed configs of federated training: DPConfig (client-side DP-SGD and DP-Flat) and FedConfig (every option
of a federated run). One source of truth: `patchlm federate`'s options are generated from FedConfig's fields, the
server and the clients read the same FedConfig from federate.json, and FedConfig's dp_* fields take their defaults
and help from DPConfig. Errors name the config field; the CLI adds the flag that sets it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from patchlm.errors import ConfigError, did_you_mean
from patchlm.typed import check_fields

SEED_AGGREGATIONS = ("fedkseed", "ferret")  # seeds and scalars on the wire (patchlm.federated.seeds)
AGGREGATIONS = ("flora", "fedit", "zeropad", "ffa", *SEED_AGGREGATIONS)
SEED_SCHEMES = ("lora", "full")
SEED_PROBABILITIES = ("uniform", "pro")
PARTITIONS = ("dirichlet", "iid", "natural")
SIGN_SCHEMES = ("mldsa", "slhdsa", "none")
BROADCASTS = ("delta", "full")
PROTOCOLS = ("merge", "continue")
RUN_TIMEOUT = 7200.0  # seconds a local `patchlm federate` deployment may run in all (not a FedConfig field)


FLAT_PARTS = ("minmax", "layers", "distill")  # DP-Flat's three parts (federated/privacy.py's docstring)
FLAT_CHOICES = ("flatness", "random")  # how the layers part picks the layers it keeps


@dataclass
class DPConfig:
    """Client-side DP-SGD (Opacus) and DP-Flat's knobs. Every validation message starts with the field's name."""

    noise_multiplier: float = field(default=1.0, metadata={
        "help": "DP noise multiplier: Gaussian noise std as a multiple of the clipping norm"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "DP per-example clipping norm"})
    delta: float | None = field(default=None, metadata={"help": "DP delta [1/n^1.1 for a client with n examples]"})
    flat: bool = field(default=False, metadata={
        "help": "DP-Flat: min-max step, flatness-guided layer choice, distillation (see docs)"})
    flat_gamma: float = field(default=0.05, metadata={"help": "DP-Flat: relative size of the min-max perturbation"})
    flat_warm: float = field(default=0.5, metadata={
        "help": "DP-Flat: fraction of the steps (the early ones) that take the min-max step"})
    flat_keep: float = field(default=0.5, metadata={"help": "DP-Flat: fraction of layers the flatness choice keeps"})
    flat_choice: str = field(default="flatness", metadata={
        "help": "DP-Flat: how the layers part picks the layers it keeps: flatness (the paper's, on public data) | "
                "random (a control: as many layers, drawn from the seed)"})
    flat_lambda: float = field(default=0.01, metadata={
        "help": "DP-Flat: distillation weight toward the public teacher"})
    teacher_steps: int = field(default=10, metadata={"help": "DP-Flat: non-private teacher steps on public data"})
    flat_parts: str = field(default="minmax,layers,distill", metadata={
        "help": "DP-Flat: which parts run, comma-separated: minmax (perturbation-aware step), layers "
                "(flatness-guided layer choice), distill (toward the public teacher)"})

    def __post_init__(self):
        check_fields(self)
        parts = [x for x in str(self.flat_parts).replace(" ", "").split(",") if x]
        bad = [x for x in parts if x not in FLAT_PARTS]
        if bad or not parts:
            raise ConfigError(f"flat_parts must be a comma-separated subset of {','.join(FLAT_PARTS)}, "
                              f"got {self.flat_parts!r}", field="flat_parts")
        self.flat_parts = ",".join(x for x in FLAT_PARTS if x in parts)  # canonical order
        if self.noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}", field="noise_multiplier")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive, got {self.max_grad_norm}", field="max_grad_norm")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}", field="delta")
        if not 0 < self.flat_keep <= 1:
            raise ConfigError(f"flat_keep must be in (0, 1], got {self.flat_keep}", field="flat_keep")
        if self.flat_choice not in FLAT_CHOICES:
            raise ConfigError(f"flat_choice {self.flat_choice!r} is unknown; "
                              f"{did_you_mean(str(self.flat_choice), FLAT_CHOICES)}", field="flat_choice")
        if not 0 <= self.flat_warm <= 1:
            raise ConfigError(f"flat_warm must be in [0, 1], got {self.flat_warm}", field="flat_warm")
        if self.teacher_steps < 0:
            raise ConfigError(f"teacher_steps must not be negative, got {self.teacher_steps}", field="teacher_steps")

    def to_dict(self) -> dict:
        return asdict(self)

    def has(self, part: str) -> bool:
        """DP-Flat is on and runs `part` (one of FLAT_PARTS)."""
        return self.flat and part in self.flat_parts.split(",")


# FedConfig field -> the DPConfig field it sets (its default and help come from there)
DP_FIELDS = {"dp_noise": "noise_multiplier", "dp_clip": "max_grad_norm", "dp_delta": "delta", "dp_flat": "flat",
             "dp_flat_parts": "flat_parts"}


def _from_dp(name: str):
    """A FedConfig field whose default and help are DPConfig's field `name` (written once, there)."""
    f = DPConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata={"help": f.metadata["help"]})


def parse_ranks(text: str) -> list[int]:
    """"16,8,4" -> [16, 8, 4] (the ranks option's text)."""
    try:
        ranks = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"ranks must be comma-separated integers such as 16,8,4, got {text!r}",
                          field="ranks") from None
    if not ranks:
        raise ConfigError("ranks is empty; give e.g. 8 or 16,8,8,4", field="ranks")
    return ranks


@dataclass
class FedConfig:
    """Every option of a federated run (one source of truth for the CLI, the server and the clients)."""

    model: str = field(default="tiny-random-llama", metadata={
        "help": "base model: built-in name or checkpoint dir", "short": "-m"})
    task: str = field(default="sms_spam", metadata={
        "help": "built-in task (health_tweets for natural clients) or local data file", "short": "-t"})
    clients: int = field(default=2, metadata={"help": "number of clients (SuperNodes)"})
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    aggregation: str = field(default="flora", metadata={
        "help": "flora | fedit | zeropad | ffa (LoRA updates) | fedkseed | ferret (seeds and scalars)"})
    ranks: list = field(default_factory=lambda: [8], metadata={
        "help": "LoRA rank per client, e.g. 16,8,8,4 (one value = every client)", "parse": parse_ranks})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha for every client [2 x its rank]"})
    targets: str = field(default="qv", metadata={
        "help": "LoRA target modules: preset (qv, attn, mlp, all-linear) or names"})
    local_steps: int = field(default=10, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=5e-4, metadata={"help": "client learning rate (AdamW, constant)"})
    max_length: int = field(default=128, metadata={"help": "max tokens per example"})
    partition: str = field(default="dirichlet", metadata={
        "help": "dirichlet | iid | natural (example['client'], e.g. health_tweets outlets)"})
    dirichlet_alpha: float = field(default=0.5, metadata={
        "help": "Dirichlet concentration over labels", "short": "--alpha-dirichlet"})
    max_train: int | None = field(default=None, metadata={
        "help": "use only the first N training examples (before partitioning)"})
    seed: int = field(default=0, metadata={"help": "seed of partitions, inits and data order"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast for client training and evaluation (about 2x faster on AVX-512 BF16 CPUs)"})
    sign: str = field(default="mldsa", metadata={
        "help": "signature on every update and broadcast: mldsa (ML-DSA-65) | slhdsa | none"})
    broadcast: str = field(default="delta", metadata={
        "help": "delta: send each client only the global rounds it has not cached yet | full: the whole history "
                "every round"})
    protocol: str = field(default="merge", metadata={
        "help": "merge: FLoRA's protocol, each round's global update is merged into the base and clients start a "
                "fresh LoRA | continue: FedIT's, clients keep training the global LoRA (fedit, zeropad, ffa)"})
    dp: bool = field(default=False, metadata={"help": "client-side DP-SGD with Opacus"})
    dp_noise: float = _from_dp("noise_multiplier")
    dp_clip: float = _from_dp("max_grad_norm")
    dp_delta: float | None = _from_dp("delta")
    dp_flat: bool = _from_dp("flat")
    dp_flat_parts: str = _from_dp("flat_parts")
    seeds: int = field(default=4096, metadata={
        "help": "fedkseed: K candidate seeds drawn once per run (replay costs K x d draws: see README)"})
    seed_probability: str = field(default="uniform", metadata={
        "help": "fedkseed: how a local step picks its seed: uniform | pro (FedKSeed-Pro, from each seed's history)"})
    zo_eps: float = field(default=5e-4, metadata={"help": "fedkseed: zeroth-order perturbation size eps"})
    scheme: str = field(default="lora", metadata={
        "help": "fedkseed / ferret: what the seeds move: lora (one shared LoRA on targets) | full (the targets' "
                "Linear weights)"})
    ferret_bases: int = field(default=64, metadata={
        "help": "ferret: shared random bases per parameter tensor each round (coefficients sent per tensor)"})
    min_clients: int | None = field(default=None, metadata={"help": "valid replies that complete a round [all]"})
    round_timeout: float = field(default=1800.0, metadata={"help": "seconds a round waits for replies"})
    straggler_timeout: float | None = field(default=None, metadata={
        "help": "once min-clients replied, wait at most this many seconds for the rest"})
    eval_limit: int = field(default=200, metadata={
        "help": "test examples the server evaluates each round (0 = none)"})
    eval_split: str = field(default="test", metadata={"help": "split the server evaluates on"})
    out: str = field(default="", metadata={"help": "run directory", "cli": False})
    run_id: str = field(default="", metadata={"help": "stable id of this run (signatures bind to it)", "cli": False})

    def __post_init__(self):
        check_fields(self)
        if isinstance(self.ranks, (int, str)):
            self.ranks = parse_ranks(str(self.ranks))
        self.ranks = [int(r) for r in self.ranks]
        if self.clients < 1:
            raise ConfigError(f"clients must be at least 1, got {self.clients}", field="clients")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}", field="rounds")
        if self.aggregation not in AGGREGATIONS:
            hint = did_you_mean(self.aggregation, AGGREGATIONS)
            raise ConfigError(f"unknown aggregation {self.aggregation!r}; {hint}", field="aggregation")
        if len(self.ranks) == 1:
            self.ranks = self.ranks * self.clients
        if len(self.ranks) != self.clients:
            raise ConfigError(f"ranks has {len(self.ranks)} values for {self.clients} clients; give one value or one "
                              "per client", field="ranks")
        if any(r <= 0 for r in self.ranks):
            raise ConfigError(f"ranks must be positive, got {self.ranks}", field="ranks")
        if self.aggregation == "fedit" and len(set(self.ranks)) > 1:
            raise ConfigError(f"fedit averages A and B separately and cannot combine mixed ranks {self.ranks}; "
                              "set aggregation to flora (exact), zeropad or ffa", field="aggregation")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"unknown partition {self.partition!r}; choices: {', '.join(PARTITIONS)}",
                              field="partition")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet_alpha must be positive, got {self.dirichlet_alpha}", field="dirichlet_alpha")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; choices: {', '.join(PROTOCOLS)}", field="protocol")
        if self.protocol == "continue" and self.aggregation == "flora":
            raise ConfigError("protocol continue does not fit flora: its global rank is the sum of the clients' "
                              "ranks and would grow every round; use protocol merge (FLoRA's own) or aggregation "
                              "fedit / zeropad / ffa", field="protocol")
        if self.broadcast not in BROADCASTS:
            raise ConfigError(f"unknown broadcast {self.broadcast!r}; choices: {', '.join(BROADCASTS)}",
                              field="broadcast")
        if self.sign not in SIGN_SCHEMES:
            raise ConfigError(f"unknown sign {self.sign!r}; choices: {', '.join(SIGN_SCHEMES)}", field="sign")
        for name in ("local_steps", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", field=name)
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}", field="lr")
        for name in ("round_timeout", "straggler_timeout"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v}", field=name)
        if self.min_clients is None:
            self.min_clients = self.clients
        if not 1 <= self.min_clients <= self.clients:
            raise ConfigError(f"min_clients must be between 1 and clients ({self.clients}), got {self.min_clients}",
                              field="min_clients")
        if self.aggregation in SEED_AGGREGATIONS:
            self._check_seeds()
        if self.dp_flat and not self.dp:
            raise ConfigError("dp_flat is a variant of DP training: set dp as well", field="dp_flat")
        try:
            self.dp_config()
        except ConfigError as e:  # name FedConfig's field (dp_noise), not DPConfig's (noise_multiplier)
            mine = next((k for k, v in DP_FIELDS.items() if v == e.field), None)
            if mine is None:
                raise
            raise ConfigError(mine + str(e)[len(e.field or ""):], field=mine) from None

    def _check_seeds(self) -> None:
        """The options of the seed-based aggregations (fedkseed, ferret)."""
        if self.seeds <= 0:
            raise ConfigError(f"seeds (K) must be positive, got {self.seeds}", field="seeds")
        if self.ferret_bases <= 0 or self.ferret_bases > 4096:
            raise ConfigError(f"ferret_bases must be in 1..4096, got {self.ferret_bases}", field="ferret_bases")
        if not self.zo_eps > 0:
            raise ConfigError(f"zo_eps must be positive, got {self.zo_eps}", field="zo_eps")
        if self.scheme not in SEED_SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; choices: {', '.join(SEED_SCHEMES)}", field="scheme")
        if self.seed_probability not in SEED_PROBABILITIES:
            raise ConfigError(f"unknown seed_probability {self.seed_probability!r}; choices: "
                              f"{', '.join(SEED_PROBABILITIES)}", field="seed_probability")
        if self.protocol != "merge":
            raise ConfigError(f"{self.aggregation} replays one shared model from seeds and scalars: protocol "
                              "continue does not apply; leave protocol at merge", field="protocol")
        if self.scheme == "lora" and len(set(self.ranks)) > 1:
            raise ConfigError(f"{self.aggregation} moves one shared LoRA, so every client has the same rank; got "
                              f"ranks {self.ranks}", field="ranks")
        if self.dp:
            why = ("Opacus privatises per-example gradients and a zeroth-order step has none; a private FedKSeed "
                   "would clip and noise each seed scalar (DPZero), which patchlm does not implement"
                   if self.aggregation == "fedkseed" else
                   "Ferret's local DP-SGD followed by the projection would be private (post-processing), but it "
                   "is not wired yet")
            raise ConfigError(f"dp is not supported with aggregation {self.aggregation}: {why}", field="dp")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FedConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown federated option(s) {', '.join(sorted(unknown))}")
        return cls(**d)

    def rank(self, k: int) -> int:
        return self.ranks[k]

    def lora_alpha(self, k: int) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.ranks[k]

    def dp_config(self) -> DPConfig:
        """The DPConfig of this run's clients (the dp_* fields; DP-Flat's other knobs at their defaults)."""
        return DPConfig(**{dp: getattr(self, mine) for mine, dp in DP_FIELDS.items()})
