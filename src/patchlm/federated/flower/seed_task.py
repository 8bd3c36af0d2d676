"""The task code of the seed-based aggregations (fedkseed, ferret) shared by the Flower apps and the CLI: the
tensors the seeds move (theta_0), the model of a round rebuilt by replay, the clients' local rounds, and the
`federate rebuild` patch writer. No Flower imports here; the algorithms are patchlm.federated.seeds.

Scheme lora: one LoRA shared by every client (rank ranks[0], alpha as configured, A seeded from the run seed,
B = 0 at round 0): theta = its A and B tensors. Scheme full: theta = the targeted Linear weights themselves. The
tensors are ordered by name (the direction of tensor i is seeded by i) and held in fp32 on CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from patchlm.errors import ConfigError
from patchlm.federated import seeds
from patchlm.federated.config import SEED_AGGREGATIONS, FedConfig
from patchlm.federated.flower.task import client_train_config, cyclic_batches, init_lora_tensors, round_seed
from patchlm.train.checkpoint import load_state
from patchlm.train.config import TrainConfig


# ---------------------------------------------------------------- theta_0 and the replayed model
def lora_spec(cfg: FedConfig, tensors: dict[str, torch.Tensor]) -> dict:
    return {"r": cfg.rank(0), "alpha": cfg.lora_alpha(0), "dropout": 0.0,
            "targets": sorted({k.rsplit(".", 1)[0] for k in tensors})}


def initial_state(model, cfg: FedConfig) -> dict[str, torch.Tensor]:
    """theta_0: the shared LoRA's initial A/B (scheme lora) or the targeted Linear weights (scheme full)."""
    from patchlm.adapters.inject import resolve_targets

    if cfg.scheme == "lora":
        return init_lora_tensors(model, cfg.targets, cfg.rank(0), cfg.seed)
    return {f"{m}.weight": model.get_submodule(m).weight.detach().float().cpu().clone()
            for m in resolve_targets(model, cfg.targets)}


def dense_history(cfg: FedConfig, history: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Each round's aggregated update as a dense float64 tensor (K-vector or [tensors, bases] matrix)."""
    if cfg.aggregation == "fedkseed":
        return [seeds.from_pairs(h, cfg.seeds) for h in history]
    return [h["coefficients"].double() for h in history]


def replay_terms(cfg: FedConfig, history: list[dict[str, torch.Tensor]]) -> list:
    dense = dense_history(cfg, history)
    if not dense:
        return []
    if cfg.aggregation == "fedkseed":
        return seeds.fedkseed_terms(seeds.candidate_seeds(cfg.seed, cfg.seeds), seeds.cumulative(dense), cfg.lr)
    return seeds.ferret_terms(cfg.seed, dense)


class SeedModel:
    """A base model carrying the replayed tensors: written into the Linear weights (full) or an attached LoRA."""

    def __init__(self, base, cfg: FedConfig):
        self.base, self.cfg = base, cfg
        self.theta0 = initial_state(base.model, cfg)
        self.names = sorted(self.theta0)
        if cfg.scheme == "lora":
            from patchlm.adapters.lora import LoraKind

            LoraKind().attach(base.model, lora_spec(cfg, self.theta0), {k: v.clone() for k, v in self.theta0.items()})

    def params(self) -> list[torch.nn.Parameter]:
        """The moved tensors as the model's parameters, in sorted-name order (the directions' tensor index)."""
        return [self.base.model.get_parameter(n) for n in self.names]

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in zip(self.names, self.params(), strict=True)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in zip(self.names, self.params(), strict=True):
            p.copy_(state[n].to(p.dtype))

    def replay(self, history: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
        """Rebuild and load the model after `history`'s rounds; (state, {seconds, draws})."""
        t0 = time.perf_counter()
        terms = replay_terms(self.cfg, history)
        state = seeds.replay(self.theta0, self.cfg.seed, terms)
        secs = time.perf_counter() - t0
        self.load(state)
        return state, {"replay_seconds": secs, "replay_draws": seeds.draws(self.theta0, terms),
                       "replay_dims": sum(v.numel() for v in self.theta0.values())}


def coefficient_shape(cfg: FedConfig, theta0: dict) -> tuple[int, int]:
    return len(theta0), cfg.ferret_bases


# ---------------------------------------------------------------- a client's local round
def _features(base, cfg: FedConfig, examples: list[dict], task):
    from patchlm.data.features import build_features, objective_for, pad_id

    objective = objective_for(task, "auto")
    sub = type(task)(**{**task.__dict__, "train": examples})
    return build_features(sub, "train", base.tokenizer, objective, cfg.max_length), pad_id(base.tokenizer)


def seed_local_train(sm: SeedModel, cfg: FedConfig, k: int, round_: int, examples: list[dict], task,
                     history: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Client k's local steps from the replayed model; (the update on the wire, metrics).

    fedkseed: cfg.local_steps zeroth-order steps (CandidateSeedZO, no weight decay), the per-seed sums of g as
    (index, value) pairs. ferret: first-order AdamW steps (client_train_config), the update's coefficients on
    the round's shared bases."""
    from patchlm.train.engine import causal_lm_loss, train_loop, unit_count
    from patchlm.train.optim import make_optimizer
    from patchlm.train.zo import CandidateSeedZO

    t0 = time.perf_counter()
    model = sm.base.model
    feats, pad = _features(sm.base, cfg, examples, task)
    seed = round_seed(cfg, round_)
    torch.manual_seed(seed * 131 + k)
    batches = cyclic_batches(feats, cfg.batch_size, seed * 131 + k, pad)
    for p in model.parameters():
        p.requires_grad_(False)
    params = sm.params()
    losses: list[float] = []
    metrics: dict = {"num_samples": len(examples)}
    if cfg.aggregation == "fedkseed":
        tcfg = TrainConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, optimizer="zo-sgd", lr=cfg.lr,
                           weight_decay=0.0, max_grad_norm=0.0, schedule="constant", warmup=0, zo_eps=cfg.zo_eps,
                           max_length=cfg.max_length, seed=cfg.seed, bf16=cfg.bf16, progress=False)
        probs = seeds.seed_probabilities(dense_history(cfg, history), cfg.seed_probability)
        rule = CandidateSeedZO(params, tcfg, model, candidates=seeds.candidate_seeds(cfg.seed, cfg.seeds),
                               probs=probs, pick_seed=seed * 131 + k)
        try:
            train_loop(model, rule, batches, cfg.local_steps, loss_fn=causal_lm_loss, bf16=cfg.bf16,
                       count=unit_count, on_step=lambda i: losses.append(i.loss))
        finally:
            rule.perturb.remove()
        acc = torch.zeros(cfg.seeds, dtype=torch.float64)
        for index, g in rule.picks:
            acc[index] += g
        update = seeds.to_pairs(acc)
        metrics.update({"seeds_used": int(update["index"].numel()), "seed_probability": cfg.seed_probability})
    else:
        start = sm.state()
        for p in params:
            p.requires_grad_(True)
        tcfg = client_train_config(cfg)
        train_loop(model, make_optimizer(tcfg.optimizer, params, tcfg), batches, cfg.local_steps,
                   loss_fn=causal_lm_loss, bf16=cfg.bf16, count=unit_count, on_step=lambda i: losses.append(i.loss))
        for p in params:
            p.requires_grad_(False)
        delta = {n: v - start[n] for n, v in sm.state().items()}
        update = {"coefficients": seeds.ferret_project(delta, cfg.seed, seeds.ferret_key(cfg.seed, round_),
                                                       cfg.ferret_bases)}
    model.eval()
    metrics["train_loss"] = sum(losses) / len(losses)
    metrics["train_seconds"] = time.perf_counter() - t0
    return update, metrics


def check_update(cfg: FedConfig, update: dict[str, torch.Tensor], n_tensors: int) -> str | None:
    """None when a client's seed update is well formed with finite values, else the reason to drop it."""
    if cfg.aggregation == "fedkseed":
        return seeds.check_pairs(update, cfg.seeds)
    if set(update) != {"coefficients"}:
        return f"expected ferret coefficients, got {sorted(update)}"
    return seeds.check_coefficients(update["coefficients"], (n_tensors, cfg.ferret_bases))


def aggregate_update(cfg: FedConfig, updates: list[dict[str, torch.Tensor]],
                     weights: list[float]) -> dict[str, torch.Tensor]:
    """The round's aggregated update on the wire: sum_k p_k of the clients' (dense) updates."""
    dense = dense_history(cfg, updates)
    agg = seeds.aggregate_scalars(dense, weights)
    if cfg.aggregation == "fedkseed":
        return seeds.to_pairs(agg.float())
    return {"coefficients": agg.float().contiguous()}


# ---------------------------------------------------------------- rebuild any round
def global_record(run: Path, round_: int) -> dict:
    """round-<r>/global of a seed run: {"update": wire tensors, "meta": {...}}."""
    return load_state(Path(run) / f"round-{round_}" / "global", "update")


def rebuild(run: str | Path, round_: int, out: str | Path, force: bool = False):
    """Write the model of round `round_` of the run in `run` as a patch: a lora patch (scheme lora and the LoRA
    aggregations) or a merged patch of dense deltas (scheme full, the kind full fine-tuning saves as)."""
    from patchlm.federated.flower.task import load_model, merged_rounds
    from patchlm.federated.rules import stack_rounds
    from patchlm.patch import Patch, provenance

    run = Path(run)
    f = run / "federate.json"
    if not f.exists():
        raise ConfigError(f"{run} is not a federated run directory (no federate.json)")
    cfg = FedConfig.from_dict(json.loads(f.read_text()))
    st = run / "state.json"
    done = int(json.loads(st.read_text())["completed_round"]) if st.exists() else 0
    if not 0 <= round_ <= done:
        raise ConfigError(f"round must be in 0..{done} (the rounds {run} completed), got {round_}", field="round")
    prov = provenance(federated={"run_id": cfg.run_id, "round": round_, "rule": cfg.aggregation,
                                 "rebuilt_from": str(run)})
    if cfg.aggregation not in SEED_AGGREGATIONS:
        if round_ == 0:
            raise ConfigError("round 0 of a LoRA run is the base model itself: nothing to write", field="round")
        hist = [Patch.load(run / f"round-{r}" / "global" / "patch").tensors for r in range(1, round_ + 1)]
        base = load_model(cfg)
        st_t = stack_rounds(merged_rounds(cfg, hist))
        ranks = {v.shape[0] for k, v in st_t.items() if k.endswith("lora_A")}
        patch = Patch("lora", base.ref(), {"r": max(ranks), "alpha": 1.0, "scaling": 1.0, "dropout": 0.0,
                                          "targets": sorted({k.rsplit(".", 1)[0] for k in st_t})}, st_t, prov,
                      metrics={"round": round_})
        return patch.save(out, force=force), {"round": round_, "kind": "lora"}
    history = [global_record(run, r)["update"] for r in range(1, round_ + 1)]
    base = load_model(cfg)
    theta0 = initial_state(base.model, cfg)
    state = seeds.replay(theta0, cfg.seed, replay_terms(cfg, history))
    h = seeds.state_hash(state)
    if cfg.scheme == "lora":
        patch = Patch("lora", base.ref(), lora_spec(cfg, state), state, prov, metrics={"round": round_,
                                                                                         "model_hash": h})
    else:
        deltas = {f"{n[: -len('.weight')]}.delta": (state[n] - theta0[n]).contiguous() for n in sorted(state)}
        patch = Patch("merged", base.ref(), {"method": cfg.aggregation, "scheme": "full", "targets": cfg.targets,
                                             "round": round_}, deltas, prov, metrics={"round": round_,
                                                                                      "model_hash": h})
    return patch.save(out, force=force), {"round": round_, "kind": patch.kind, "model_hash": h}
