"""The task code shared by the Flower apps: the run configuration, client data partitions, the client's local
LoRA training (plain or DP), and the server's model state and evaluation. No Flower imports here.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from patchlm.errors import ConfigError, DataError

AGGREGATIONS = ("flora", "fedit", "zeropad", "ffa")
PARTITIONS = ("dirichlet", "iid", "natural")
SIGN_SCHEMES = ("mldsa", "slhdsa", "none")
BROADCASTS = ("delta", "full")
PROTOCOLS = ("merge", "continue")


@dataclass
class FedConfig:
    """Every option of a federated run (one source of truth for the CLI, the server and the clients)."""

    model: str = field(default="tiny-random-llama", metadata={"help": "base model (built-in name or path)"})
    task: str = field(default="sms_spam", metadata={"help": "built-in task or local data file"})
    clients: int = field(default=2, metadata={"help": "number of clients (SuperNodes)"})
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    aggregation: str = field(default="flora", metadata={"help": "flora | fedit | zeropad | ffa"})
    ranks: list = field(default_factory=lambda: [8], metadata={"help": "LoRA rank per client (one value = all)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha for every client [2 x its rank]"})
    targets: str = field(default="qv", metadata={"help": "LoRA target modules (preset or names)"})
    local_steps: int = field(default=10, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=5e-4, metadata={"help": "client learning rate (AdamW)"})
    max_length: int = field(default=128, metadata={"help": "max tokens per example"})
    partition: str = field(default="dirichlet", metadata={"help": "dirichlet | iid | natural (health_tweets outlets)"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration over labels"})
    max_train: int | None = field(default=None, metadata={"help": "cap on the task's train examples (before partitioning)"})
    seed: int = field(default=0, metadata={"help": "seed of partitions, inits and data order"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for client training and evaluation"})
    sign: str = field(default="mldsa", metadata={"help": "mldsa | slhdsa | none"})
    broadcast: str = field(default="delta", metadata={"help": "delta (only the rounds a client lacks) | full"})
    protocol: str = field(default="merge", metadata={"help": "merge (FLoRA: merge each round into the base, fresh "
                                                              "LoRA next round) | continue (FedIT: clients keep "
                                                              "training the global LoRA)"})
    dp: bool = field(default=False, metadata={"help": "client-side DP-SGD (Opacus)"})
    dp_noise: float = field(default=1.0, metadata={"help": "DP noise multiplier"})
    dp_clip: float = field(default=1.0, metadata={"help": "DP per-example clipping norm"})
    dp_delta: float | None = field(default=None, metadata={"help": "DP delta [1/n^1.1 per client]"})
    dp_flat: bool = field(default=False, metadata={"help": "DP-Flat: min-max step, flatness layer choice, distillation"})
    min_clients: int | None = field(default=None, metadata={"help": "replies needed to complete a round [all]"})
    round_timeout: float = field(default=1800.0, metadata={"help": "seconds a round waits for replies"})
    straggler_timeout: float | None = field(default=None, metadata={"help": "once min_clients replied, wait at most this long for the rest"})
    eval_limit: int = field(default=200, metadata={"help": "test examples for the server's evaluation (0 = none)"})
    eval_split: str = field(default="test", metadata={"help": "split the server evaluates on"})
    out: str = field(default="", metadata={"help": "run directory"})
    run_id: str = field(default="", metadata={"help": "stable id of this run (signatures bind to it)"})

    def __post_init__(self):
        if isinstance(self.ranks, (int, str)):
            self.ranks = parse_ranks(str(self.ranks))
        self.ranks = [int(r) for r in self.ranks]
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {self.clients}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.aggregation not in AGGREGATIONS:
            from patchlm.errors import did_you_mean

            raise ConfigError(f"unknown --aggregation {self.aggregation!r}; {did_you_mean(self.aggregation, AGGREGATIONS)}")
        if len(self.ranks) == 1:
            self.ranks = self.ranks * self.clients
        if len(self.ranks) != self.clients:
            raise ConfigError(f"--ranks has {len(self.ranks)} values for {self.clients} clients; give one value or one per client")
        if any(r <= 0 for r in self.ranks):
            raise ConfigError(f"--ranks must be positive, got {self.ranks}")
        if self.aggregation == "fedit" and len(set(self.ranks)) > 1:
            raise ConfigError(f"fedit averages A and B separately and cannot combine mixed ranks {self.ranks}; "
                              "use --aggregation flora (exact), zeropad or ffa")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"unknown --partition {self.partition!r}; choices: {', '.join(PARTITIONS)}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"--alpha (Dirichlet) must be positive, got {self.dirichlet_alpha}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown --protocol {self.protocol!r}; choices: {', '.join(PROTOCOLS)}")
        if self.protocol == "continue" and self.aggregation == "flora":
            raise ConfigError("--protocol continue does not fit flora: its global rank is the sum of the clients' "
                              "ranks and would grow every round; use --protocol merge (FLoRA's own) or "
                              "--aggregation fedit / zeropad / ffa")
        if self.broadcast not in BROADCASTS:
            raise ConfigError(f"unknown --broadcast {self.broadcast!r}; choices: {', '.join(BROADCASTS)}")
        if self.sign not in SIGN_SCHEMES:
            raise ConfigError(f"unknown --sign {self.sign!r}; choices: {', '.join(SIGN_SCHEMES)}")
        for name in ("local_steps", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.min_clients is None:
            self.min_clients = self.clients
        if not 1 <= self.min_clients <= self.clients:
            raise ConfigError(f"--min-clients must be between 1 and --clients ({self.clients}), got {self.min_clients}")
        if self.dp_flat and not self.dp:
            raise ConfigError("--dp-flat is a variant of DP training: add --dp")

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

    def dp_config(self):
        from patchlm.federated.privacy import DPConfig

        return DPConfig(noise_multiplier=self.dp_noise, max_grad_norm=self.dp_clip, delta=self.dp_delta,
                        flat=self.dp_flat)


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated integers such as 16,8,4, got {text!r}") from None
    if not ranks:
        raise ConfigError("--ranks is empty; give e.g. 8 or 16,8,8,4")
    return ranks


# ---------------------------------------------------------------- data
def load_fed_task(cfg: FedConfig):
    from patchlm.data import load_task

    return load_task(cfg.task, seed=cfg.seed)


def partition_indices(task, num_clients: int, method: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
                      min_size: int = 2, max_train: int | None = None) -> list[list[int]]:
    """Indices into task.train for each client: Dirichlet over labels, IID, or natural clients (example['client'])."""
    n = len(task.train) if max_train is None else min(max_train, len(task.train))
    if n < num_clients * min_size:
        raise DataError(f"task {task.name} has {n} training examples: too few for {num_clients} clients "
                        f"with at least {min_size} each")
    rng = random.Random(seed)
    if method == "iid":
        order = list(range(n))
        rng.shuffle(order)
        return [sorted(order[k::num_clients]) for k in range(num_clients)]
    if method == "natural":
        groups: dict[str, list[int]] = {}
        for i in range(n):
            c = task.train[i].get("client")
            if c is None:
                raise DataError(f"task {task.name} has no 'client' field for natural partitioning; "
                                "use --partition dirichlet (or health_tweets, whose clients are news outlets)")
            groups.setdefault(str(c), []).append(i)
        if len(groups) < num_clients:
            raise DataError(f"task {task.name} has {len(groups)} natural clients, fewer than --clients {num_clients}")
        biggest = sorted(groups, key=lambda g: (-len(groups[g]), g))[:num_clients]
        return [groups[g] for g in biggest]
    if method != "dirichlet":
        raise ConfigError(f"unknown partition {method!r}; choices: {', '.join(PARTITIONS)}")
    if task.kind != "classification":
        raise DataError(f"Dirichlet partitioning splits by label, but task {task.name} is {task.kind}; "
                        "use --partition iid or natural")
    import numpy as np

    by_label: dict[int, list[int]] = {}
    for i in range(n):
        by_label.setdefault(int(task.train[i]["label"]), []).append(i)
    gen = np.random.default_rng(seed)
    for _attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            idx = list(by_label[label])
            gen.shuffle(idx)
            q = gen.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(np.array(idx), cuts)):
                parts[k].extend(int(x) for x in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(f"could not draw a Dirichlet(alpha={alpha}) partition giving every one of {num_clients} "
                    f"clients at least {min_size} examples; raise --alpha or lower --clients")


def client_examples(task, cfg: FedConfig, k: int) -> list[dict]:
    if not 0 <= k < cfg.clients:
        raise ConfigError(f"client index {k} is outside 0..{cfg.clients - 1}")
    parts = partition_indices(task, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed,
                              min_size=2, max_train=cfg.max_train)
    return [task.train[i] for i in parts[k]]


def label_histogram(task, examples: list[dict]) -> list[int] | None:
    if task.kind != "classification":
        return None
    h = [0] * len(task.labels)
    for e in examples:
        h[int(e["label"])] += 1
    return h


# ---------------------------------------------------------------- model
def merged_rounds(cfg: FedConfig, history: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The global updates that make up the current model: every round's under the merge protocol (each round's
    global is an increment), only the last one under the continue protocol (each round's global is the whole
    adapter)."""
    return list(history) if cfg.protocol == "merge" else list(history[-1:])


def load_model(cfg: FedConfig, history: list[dict[str, torch.Tensor]] | None = None):
    """The base with the global updates of `history` merged into its weights (see merged_rounds)."""
    from patchlm.federated.rules import merge_tensors_into_model
    from patchlm.models import load_base

    base = load_base(cfg.model)
    for t in merged_rounds(cfg, history or []):
        merge_tensors_into_model(base.model, t)
    return base


def lora_from_global(glob: dict[str, torch.Tensor], r: int, scaling: float) -> dict[str, torch.Tensor]:
    """A client's starting LoRA under the continue protocol: the global adapter (scaling 1) truncated to the
    client's rank (its first r rows of A / columns of B, as HetLoRA does) and with B divided by the client's
    own scaling alpha / r, so the client's adapter computes the global's B A at its own rank."""
    out = {}
    for k, v in glob.items():
        if k.endswith("lora_A"):
            if v.shape[0] < r:
                raise ValueError(f"the global adapter has rank {v.shape[0]} < the client's rank {r} for {k[:-7]}")
            out[k] = v[:r].float().clone()
        else:
            out[k] = (v[:, :r].float() / scaling).clone()
    return out


def init_lora_tensors(model, targets, r: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh LoRA: A Kaiming-uniform from a per-module generator seeded by (seed, module name), B = 0.

    A of rank r is the first r rows of A of any larger rank drawn with the same seed, so clients of different
    ranks share one frozen A in FFA-LoRA."""
    from patchlm.adapters.inject import resolve_targets

    out = {}
    for name in resolve_targets(model, targets):
        mod = model.get_submodule(name)
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        bound = 1.0 / math.sqrt(mod.in_features)
        out[f"{name}.lora_A"] = (torch.rand(r, mod.in_features, generator=gen) * 2 - 1) * bound
        out[f"{name}.lora_B"] = torch.zeros(mod.out_features, r)
    return out


def round_seed(cfg: FedConfig, round_: int) -> int:
    return cfg.seed * 10_007 + round_


def local_train(base, cfg: FedConfig, k: int, round_: int, examples: list[dict], task, log=None,
                start: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Train client k's LoRA for cfg.local_steps on its examples; return (tensors, metrics). The LoRA starts
    fresh (merge protocol, or the first round) or from the global adapter `start` (continue protocol)."""
    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear
    from patchlm.data.features import build_features, objective_for
    from patchlm.data.features import collate
    from patchlm.train.engine import causal_lm_loss

    t0 = time.perf_counter()
    r, alpha = cfg.rank(k), cfg.lora_alpha(k)
    seed = round_seed(cfg, round_)
    torch.manual_seed(seed * 131 + k)
    model = base.model
    init = init_lora_tensors(model, cfg.targets, r, seed)
    if start:
        glob = lora_from_global(start, r, alpha / r)
        if set(glob) != set(init):
            raise ValueError("the global adapter does not cover this client's target modules")
        init = glob
    spec = {"r": r, "alpha": alpha, "dropout": 0.0, "targets": sorted({n.rsplit(".", 1)[0] for n in init})}
    kind = LoraKind()
    kind.attach(model, spec, init, seed=seed)
    mods = wrapped_modules(model, LoraLinear)
    params = [m.lora_B for m in mods.values()] if cfg.aggregation == "ffa" else kind.trainable_parameters(model)
    if cfg.aggregation == "ffa":
        for m in mods.values():
            m.lora_A.requires_grad_(False)
    objective = objective_for(task, "auto")
    sub = type(task)(**{**task.__dict__, "train": examples})
    feats = build_features(sub, "train", base.tokenizer, objective, cfg.max_length)
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    metrics: dict = {"num_samples": len(examples), "rank": r, "alpha": alpha}
    if cfg.dp:
        from patchlm.federated.privacy import dp_train

        public = None
        if cfg.dp_flat:  # the task's validation split stands in for public data (never a client's train data)
            public = build_features(task, "validation", base.tokenizer, objective, cfg.max_length, limit=256)
        rec = dp_train(model, params, feats, pad, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       dp=cfg.dp_config(), seed=seed * 131 + k, bf16=cfg.bf16, lora_modules=mods,
                       public_feats=public, log=log)
        metrics.update({"train_loss": rec.pop("train_loss"), "dp": rec})
    else:
        autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if cfg.bf16 else _null()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        order = list(range(len(feats)))
        rng = random.Random(seed * 131 + k)
        rng.shuffle(order)
        model.train()
        losses = []
        for s in range(cfg.local_steps):
            sel = [feats[order[(s * cfg.batch_size + j) % len(order)]] for j in range(cfg.batch_size)]
            batch = {kk: v.to(model.device) for kk, v in collate(sel, pad).items()}
            with autocast:
                loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        metrics["train_loss"] = sum(losses) / len(losses)
    model.eval()
    tensors = kind.state(model)
    kind.detach(model)
    metrics["train_seconds"] = time.perf_counter() - t0
    return tensors, metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def evaluate_model(base, task, cfg: FedConfig) -> dict:
    """Accuracy (classification) or perplexity (text) of the server's current model on the eval split."""
    if not cfg.eval_limit:
        return {}
    from patchlm.evaluate import evaluate

    m = evaluate(base.model, base.tokenizer, task, split=cfg.eval_split, limit=cfg.eval_limit, bf16=cfg.bf16)
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


def write_json(path: Path, obj) -> None:
    from patchlm.paths import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
