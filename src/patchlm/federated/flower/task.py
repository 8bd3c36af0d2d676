"""The task code shared by the Flower apps: client data partitions, the client's local LoRA training (plain or
DP, both on patchlm's training engine), and the server's model state and evaluation. No Flower imports here; the
run configuration is patchlm.federated.config.FedConfig.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from pathlib import Path

import torch

from patchlm.errors import ConfigError, DataError
from patchlm.federated.config import PARTITIONS, FedConfig
from patchlm.federated.privacy import dp_train
from patchlm.paths import atomic_write_text
from patchlm.train.config import TrainConfig


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
                                "set partition to dirichlet (or use health_tweets, whose clients are news outlets)")
            groups.setdefault(str(c), []).append(i)
        if len(groups) < num_clients:
            raise DataError(f"task {task.name} has {len(groups)} natural clients, fewer than the {num_clients} "
                            "clients asked for")
        biggest = sorted(groups, key=lambda g: (-len(groups[g]), g))[:num_clients]
        return [groups[g] for g in biggest]
    if method != "dirichlet":
        raise ConfigError(f"unknown partition {method!r}; choices: {', '.join(PARTITIONS)}", field="partition")
    if task.kind != "classification":
        raise DataError(f"Dirichlet partitioning splits by label, but task {task.name} is {task.kind}; "
                        "set partition to iid or natural")
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
                    f"clients at least {min_size} examples; raise dirichlet_alpha or lower clients")


def client_examples(task, cfg: FedConfig, k: int) -> list[dict]:
    if not 0 <= k < cfg.clients:
        raise ConfigError(f"client index {k} is outside 0..{cfg.clients - 1}")
    parts = partition_indices(task, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed,
                              min_size=2, max_train=cfg.max_train)
    return [task.train[i] for i in parts[k]]


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


def client_train_config(cfg: FedConfig) -> TrainConfig:
    """The step rule's settings of a client's local training: AdamW at the constant rate cfg.lr, no weight decay,
    gradients clipped to norm 1 (DP training clips per example instead and ignores max_grad_norm)."""
    return TrainConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, optimizer="adamw", lr=cfg.lr,
                       weight_decay=0.0, max_grad_norm=1.0, schedule="constant", warmup=0, max_length=cfg.max_length,
                       seed=cfg.seed, bf16=cfg.bf16, progress=False)


def cyclic_batches(feats: list[dict], batch_size: int, seed: int, pad: int):
    """batches(step) for the engine: one shuffled pass order (random.Random(seed)), cycled, batch_size per step."""
    from patchlm.data.features import collate

    order = list(range(len(feats)))
    random.Random(seed).shuffle(order)

    def batches(s: int) -> list[dict[str, torch.Tensor]]:
        sel = [feats[order[(s * batch_size + j) % len(order)]] for j in range(batch_size)]
        return [collate(sel, pad)]

    return batches


def local_train(base, cfg: FedConfig, k: int, round_: int, examples: list[dict], task, log=None,
                start: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Train client k's LoRA for cfg.local_steps on its examples; return (tensors, metrics). The LoRA starts
    fresh (merge protocol, or the first round) or from the global adapter `start` (continue protocol)."""
    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear
    from patchlm.data.features import build_features, objective_for, pad_id
    from patchlm.train.engine import causal_lm_loss, train_loop, unit_count
    from patchlm.train.optim import make_optimizer

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
    pad = pad_id(base.tokenizer)
    metrics: dict = {"num_samples": len(examples), "rank": r, "alpha": alpha}
    tcfg = client_train_config(cfg)
    if cfg.dp:
        public, dpc = None, cfg.dp_config()
        if dpc.has("layers") or dpc.has("distill"):  # the task's validation split stands in for public data
            public = build_features(task, "validation", base.tokenizer, objective, cfg.max_length, limit=256)
        rec = dp_train(model, params, feats, pad, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       dp=dpc, seed=seed * 131 + k, bf16=cfg.bf16, lora_modules=mods,
                       public_feats=public, log=log)
        metrics.update({"train_loss": rec.pop("train_loss"), "dp": rec})
    else:
        losses: list[float] = []
        train_loop(model, make_optimizer(tcfg.optimizer, params, tcfg),
                   cyclic_batches(feats, cfg.batch_size, seed * 131 + k, pad), cfg.local_steps,
                   loss_fn=causal_lm_loss, bf16=cfg.bf16, count=unit_count, on_step=lambda i: losses.append(i.loss))
        metrics["train_loss"] = sum(losses) / len(losses)
    model.eval()
    tensors = kind.state(model)
    kind.detach(model)
    metrics["train_seconds"] = time.perf_counter() - t0
    return tensors, metrics


def evaluate_model(base, task, cfg: FedConfig) -> dict:
    """Accuracy (classification) or perplexity (text) of the server's current model on the eval split."""
    if not cfg.eval_limit:
        return {}
    from patchlm.evaluate import evaluate

    m = evaluate(base.model, base.tokenizer, task, split=cfg.eval_split, limit=cfg.eval_limit, bf16=cfg.bf16)
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
