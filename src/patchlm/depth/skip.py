"""MindSkip routers (Router-Tuning): learn which sequences may skip the attention of chosen layers.

Per routed layer: s = sigmoid(w . mean_t(Norm(h)_t)), w in R^hidden, zero-initialised, no bias
(token-level option: one score per token). Decision: run the attention when s >= 0.5, skip when s < 0.5;
zero init gives s = 0.5 exactly, which runs it, so a fresh router changes nothing.
Training: m = step(s - 0.5) with a straight-through gradient (forward m, backward ds), h = h + m * Attn(Norm(h)),
loss = LM loss + lambda * capacity, capacity = mean(m) or relu(mean(m) - target); only routers train.
Inference (sequence level): the batch is split and only selected sequences run the attention; the decision
made at prefill is kept for that cache object and reused while decoding; a skipped layer writes no cache.
Token-level routing is a masked study variant: it saves no compute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from patchlm.data.features import build_features, collate, objective_for, pad_id
from patchlm.depth import runtime
from patchlm.depth.arch import check_indices, decoder_layers
from patchlm.depth.config import GRANULARITIES, SkipConfig
from patchlm.errors import ConfigError, PatchFormatError, TrainingInterrupted
from patchlm.patch import Patch, PatchKind, provenance, register_kind
from patchlm.paths import atomic_dir
from patchlm.train.checkpoint import load_state, save_state
from patchlm.train.config import TrainConfig
from patchlm.train.engine import StepInfo, StopRequest, causal_lm_loss, train_loop, unit_count
from patchlm.train.optim import make_optimizer
from patchlm.typed import parse_index_list


@dataclass
class Gate:
    differentiable: bool
    token_level: bool
    mask: torch.Tensor | None = None   # float, [B,1,1] or [B,T,1], straight-through in training
    keep: torch.Tensor | None = None   # bool [B] (sequence level, inference)


class Router(nn.Module):
    """A linear score from the (normed) hidden state; weight [1, hidden], no bias."""

    def __init__(self, hidden: int, granularity: str = SkipConfig.granularity):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ConfigError(f"unknown router granularity {granularity!r}; choices: {', '.join(GRANULARITIES)}",
                              field="granularity")
        self.weight = nn.Parameter(torch.zeros(1, hidden, dtype=torch.float32))
        self.granularity = granularity
        self._cached: tuple | None = None  # (weakref to the cache, keep)
        self.last_mask: torch.Tensor | None = None
        self.stats = {"calls": 0, "kept": 0, "seen": 0}

    def score(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """s in (0,1): [B,1,1] (sequence) or [B,T,1] (token)."""
        xf = x.float()
        if self.granularity == "sequence":
            mask = ctx.mask2d if ctx is not None else None
            if mask is not None and mask.shape[0] == x.shape[0] and mask.shape[1] >= x.shape[1]:
                m = mask[:, -x.shape[1]:].to(xf.dtype).unsqueeze(-1)
                xf = (xf * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            else:
                xf = xf.mean(1, keepdim=True)
        return torch.sigmoid(xf @ self.weight.float().t())

    def gate(self, x: torch.Tensor, ctx, cache) -> Gate:
        token = self.granularity == "token"
        if torch.is_grad_enabled() and self.weight.requires_grad and self.training:
            s = self.score(x, ctx)
            hard = (s >= 0.5).to(s.dtype)
            m = hard + s - s.detach()
            self.last_mask = m
            return Gate(True, token, mask=m)
        if token:
            s = self.score(x, ctx)
            m = (s >= 0.5).to(x.dtype)
            self._count(int(m.sum()), m.numel())
            return Gate(False, True, mask=m)
        key = self._cached
        if cache is not None and key is not None and key[0]() is cache and key[1].shape[0] == x.shape[0]:
            return Gate(False, False, keep=key[1])  # decoding: reuse the prefill decision
        keep = (self.score(x, ctx) >= 0.5).flatten()
        ref = runtime.cache_key(cache)
        self._cached = (ref, keep) if ref is not None else None
        self._count(int(keep.sum()), keep.numel())
        return Gate(False, False, keep=keep)

    def _count(self, kept: int, seen: int) -> None:
        self.stats["calls"] += 1
        self.stats["kept"] += kept
        self.stats["seen"] += seen


def default_layers(num_layers: int, n: int | None = None) -> list[int]:
    """The last n layers but the final one (n defaults to half the layers; SkipConfig.last)."""
    n = num_layers // 2 if n is None else n
    if not 1 <= n <= num_layers - 2:
        raise ConfigError(f"last {n} is out of range: route between 1 and {num_layers - 2} layers "
                          f"(the first and final layers stay unrouted) of this {num_layers}-layer model", field="last")
    return list(range(num_layers - 1 - n, num_layers - 1))


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'3,5,10-12' -> [3, 5, 10, 11, 12] (checked against the model's depth)."""
    return check_indices(parse_index_list(text, "layers"), num_layers, "routed")


@register_kind("router", stage="depth")
class RouterKind(PatchKind):
    """spec: layers, granularity, hidden_size, num_layers (+ training facts). tensors: layers.<i>.router.weight."""

    def attach(self, model, spec, tensors=None, seed=0):
        n = len(decoder_layers(model))
        if int(spec.get("num_layers", n)) != n:
            raise PatchFormatError(f"router patch was made for a model with {spec['num_layers']} layers, "
                                   f"this one has {n}")
        hidden = int(model.config.hidden_size)
        if int(spec.get("hidden_size", hidden)) != hidden:
            raise PatchFormatError(f"router patch has hidden size {spec['hidden_size']}, the model {hidden}")
        layers = check_indices(spec.get("layers") or default_layers(n), n, "routed")
        gran = spec.get("granularity", SkipConfig.granularity)
        device = next(model.parameters()).device
        rs = {}
        for i in layers:
            r = Router(hidden, gran).to(device)
            r.train(model.training)
            if tensors is not None:
                w = tensors.get(f"layers.{i}.router.weight")
                if w is None:
                    raise PatchFormatError(f"router patch has no tensor layers.{i}.router.weight")
                if tuple(w.shape) != (1, hidden):
                    raise PatchFormatError(f"router for layer {i} has shape {tuple(w.shape)}, expected (1, {hidden})")
                with torch.no_grad():
                    r.weight.copy_(w)
            rs[i] = r
        runtime.install_routers(model, rs)
        for p in model.parameters():
            p.requires_grad_(False)
        for r in rs.values():
            r.weight.requires_grad_(True)
        return {**spec, "layers": layers, "granularity": gran}

    def detach(self, model):
        runtime.remove_routers(model)

    def state(self, model):
        return {f"layers.{i}.router.weight": r.weight.detach().float().cpu().contiguous()
                for i, r in runtime.routers(model).items()}

    def trainable_parameters(self, model):
        return [r.weight for r in runtime.routers(model).values()]

    def summary(self, spec, tensors):
        return {"routed_layers": spec.get("layers"), "granularity": spec.get("granularity", "sequence")}


def route_stats(model) -> dict[int, float]:
    """Fraction of sequences (or tokens) that ran each routed attention since the last reset."""
    return {i: (r.stats["kept"] / r.stats["seen"] if r.stats["seen"] else float("nan"))
            for i, r in runtime.routers(model).items()}


def reset_stats(model) -> None:
    for r in runtime.routers(model).values():
        r.stats = {"calls": 0, "kept": 0, "seen": 0}


# ---------------------------------------------------------------- the speed bound
def prefill_flops(config, seq_len: int, batch: int = 1, logits_to_keep: int | None = 1) -> dict[str, float]:
    """Matrix-product FLOPs (2 per multiply-add) of one prefill of `batch` x `seq_len` tokens, by part.

    attention (per layer): the q, k, v, o projections plus the causal score and value products
    (sum over query positions t of t keys, per head); mlp (per layer): gate, up and down projections;
    head: the output projection for `logits_to_keep` positions per sequence (None: every position).
    Norms, rotary embeddings, softmax and the embedding lookup are not counted (small next to these)."""
    h, inter = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or h // heads)
    n, tok = int(config.num_hidden_layers), batch * seq_len
    proj = h * heads * hd * 2 + h * kv * hd * 2             # q and o; k and v
    scores = 2 * heads * hd * seq_len * (seq_len + 1) / 2    # q.k and p.v over the causal triangle, per sequence
    attn = 2 * (tok * proj + batch * scores)
    mlp = 2 * tok * 3 * h * inter
    kept = seq_len if logits_to_keep is None else min(int(logits_to_keep), seq_len)
    head = 2 * batch * kept * h * int(config.vocab_size)
    return {"attention_per_layer": float(attn), "mlp_per_layer": float(mlp), "head": float(head),
            "layers": float(n), "total": float(n * (attn + mlp) + head)}


def speed_bound(config, layers, seq_len: int, batch: int = 1, logits_to_keep: int | None = 1) -> dict[str, float]:
    """The analytic prefill speedup if the attention of every layer in `layers` were skipped for every sequence:
    total FLOPs / (total - skipped attention FLOPs), with the shares it comes from (see `prefill_flops`).
    No router can beat it at these shapes; a wall-clock bound on a given machine is measured, not computed."""
    f = prefill_flops(config, seq_len, batch, logits_to_keep)
    n = int(f["layers"])
    idx = check_indices(list(layers), n, "routed")
    skipped = len(idx) * f["attention_per_layer"]
    layer = f["attention_per_layer"] + f["mlp_per_layer"]
    return {"routed_layers": float(len(idx)), "attention_share_of_layer": f["attention_per_layer"] / layer,
            "head_share": f["head"] / f["total"], "skipped_share": skipped / f["total"],
            "bound": f["total"] / (f["total"] - skipped), **{f"flops_{k}": v for k, v in f.items() if k != "layers"}}


def speedup_at(bound: float, executed: float) -> float:
    """The speedup a router reaches when a fraction `executed` of the routed attentions still runs, if the
    time saved is proportional to the attentions skipped: 1 / (1 - (1 - executed) * (1 - 1 / bound))."""
    if not 0.0 <= executed <= 1.0:
        raise ConfigError(f"executed fraction must be in [0, 1], got {executed}")
    return 1.0 / (1.0 - (1.0 - executed) * (1.0 - 1.0 / bound))


# ---------------------------------------------------------------- training
CHECKPOINT = "state"  # a router checkpoint directory holds state.safetensors + state.json (patchlm.train.checkpoint)


def data_order(n: int, epochs: int, seed: int, batch_size: int) -> list[list[int]]:
    """The feature indices of every training step: each epoch reshuffles the previous epoch's order in place
    with Random(seed * 1009 + epoch) and cuts it into batches (so step k's batch is known before step k runs)."""
    order = list(range(n))
    out = []
    for ep in range(epochs):
        random.Random(seed * 1009 + ep).shuffle(order)
        out += [order[s: s + batch_size] for s in range(0, n, batch_size)]
    return out


def has_checkpoint(checkpoint_dir) -> bool:
    """Whether `checkpoint_dir` holds a router checkpoint that `train_routers(resume=True)` can continue."""
    return checkpoint_dir is not None and (Path(checkpoint_dir) / f"{CHECKPOINT}.json").exists()


def _save_checkpoint(ckpt: Path, step: int, spec: dict, params, rule, hist: list[dict]) -> None:
    """Routers, the optimizer's state_dict, step, spec and loss history in safetensors + JSON; the directory is
    replaced in one rename, so a kill mid-write leaves the previous checkpoint."""
    with atomic_dir(ckpt, force=True) as tmp:
        save_state(tmp, CHECKPOINT, {"step": step, "spec": spec, "params": [p.detach() for p in params],
                                     "optimizer": rule.state_dict(), "hist": hist})


def check_resumable(checkpoint_dir) -> None:
    """Refuse to resume from a directory without a router checkpoint (a state.pt of an older patchlm is a pickle,
    which could run code when loaded: it is never read)."""
    if not has_checkpoint(checkpoint_dir):
        old = " (its state.pt, from an older patchlm, is a pickle and is never loaded)" \
            if checkpoint_dir is not None and (Path(checkpoint_dir) / "state.pt").exists() else ""
        raise ConfigError(f"nothing to resume: no router checkpoint in {checkpoint_dir}{old}")


def _load_checkpoint(ckpt: Path | None, spec: dict) -> dict:
    """The saved training state, refused when it was made with other settings."""
    check_resumable(ckpt)
    st = load_state(ckpt, CHECKPOINT)
    if st["spec"] != spec:
        diff = sorted(k for k in set(spec) | set(st["spec"]) if spec.get(k) != st["spec"].get(k))
        raise ConfigError(f"the checkpoint in {ckpt} was made with other settings ({', '.join(diff)}); "
                          "use the same options or start over with --force")
    return st


def train_routers(base, task, layers: list[int] | None = None, granularity: str | None = None,
                  config: SkipConfig | None = None, log=None, progress: bool = False,
                  checkpoint_dir=None, save_every: int | None = None, resume: bool = False,
                  stop_after: int | None = None) -> Patch:
    """Attach zero-initialised routers to `base.model` and train them (base frozen); return the router patch.

    Runs the engine's loop with AdamW (config.lr, no weight decay, no clipping) on loss = LM loss + lam * capacity.
    `layers` defaults to the last config.last layers but the final one, `granularity` to config.granularity.
    With `checkpoint_dir`, the routers, the optimizer state and the step are saved every `save_every` steps
    (config.save_every); `resume=True` continues from that checkpoint (same data order, so the result equals an
    uninterrupted run). `stop_after` ends training after that many steps (with a checkpoint) and raises
    `TrainingInterrupted`."""
    cfg = config or SkipConfig()
    granularity = granularity or cfg.granularity
    save_every = cfg.save_every if save_every is None else save_every
    log = log or (lambda m: None)
    model = base.model
    n = len(decoder_layers(model))
    layers = check_indices(layers, n, "routed") if layers else default_layers(n, cfg.last)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown router granularity {granularity!r}; choices: {', '.join(GRANULARITIES)}",
                          field="granularity")
    objective = objective_for(task)
    feats = build_features(task, "train", base.tokenizer, objective, cfg.max_length, limit=cfg.samples)
    if not feats:
        raise ConfigError(f"task {task.name} has no training examples for the routers")
    spec = {"layers": layers, "granularity": granularity, "hidden_size": int(model.config.hidden_size),
            "num_layers": n, "threshold": 0.5, "lambda": cfg.lam, "target": cfg.target, "lr": cfg.lr,
            "samples": len(feats), "objective": objective, "epochs": cfg.epochs, "max_length": cfg.max_length,
            "seed": cfg.seed}
    kind = RouterKind()
    torch.manual_seed(cfg.seed)
    kind.attach(model, spec, None)
    params = kind.trainable_parameters(model)
    # AdamW on the routers at SkipConfig's rate: no weight decay, no clipping, TrainConfig's (torch's) betas
    rule = make_optimizer("adamw", params, TrainConfig(lr=cfg.lr, weight_decay=0.0, max_grad_norm=0.0))
    pad = pad_id(base.tokenizer)
    rs = runtime.routers(model)
    plan = data_order(len(feats), cfg.epochs, cfg.seed, cfg.batch_size)
    steps = len(plan)
    hist: list[dict] = []
    done = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        st = _load_checkpoint(ckpt, spec)
        with torch.no_grad():
            for p, saved in zip(params, st["params"], strict=True):
                p.copy_(saved)
        rule.load_state_dict(st["optimizer"])
        done, hist = int(st["step"]), list(st["hist"])
        log(f"resuming router training after step {done} of {steps}")
    last: dict[str, float] = {}

    def loss_fn(m, batch):
        lm, labelled = causal_lm_loss(m, batch)
        used = torch.stack([r.last_mask.float().mean() for r in rs.values()]).mean()
        cap = used if cfg.target is None else torch.relu(used - cfg.target)
        last["lm_loss"], last["capacity"] = float(lm.detach()), float(used.detach())
        return lm.float() + cfg.lam * cap, labelled

    def batches(step: int) -> list[dict]:
        return [collate([feats[i] for i in plan[step]], pad)]

    def on_step(info: StepInfo) -> None:
        hist.append(dict(last))
        if ckpt is not None and (info.step % save_every == 0 or info.step == stop_after):
            _save_checkpoint(ckpt, info.step, spec, params, rule, hist)
        if stop_after is not None and stop_after <= info.step < steps:
            raise TrainingInterrupted(f"router training stopped after step {info.step} of {steps}; "
                                      "continue with --resume")

    try:
        # one micro-batch per step, weighted 1: the loss is back-propagated as computed (bit-exact)
        with StopRequest() as stop:
            at = train_loop(model, rule, batches, steps, start=done, loss_fn=loss_fn, bf16=cfg.bf16,
                            count=unit_count, on_step=on_step, progress=progress, desc="train routers", stop=stop)
        if at < steps:  # Ctrl-C / SIGTERM: stopped at a step boundary
            where = "nothing was saved (no checkpoint directory)"
            if ckpt is not None:
                _save_checkpoint(ckpt, at, spec, params, rule, hist)
                where = f"checkpoint after step {at} of {steps}; continue with --resume"
            raise TrainingInterrupted(f"router training interrupted: {where}", exit_code=stop.exit_code)
    finally:
        model.eval()
    for r in rs.values():
        r.last_mask = None
    tail = hist[-max(1, len(hist) // 10):]
    metrics = {"steps": len(hist), "final_lm_loss": sum(h["lm_loss"] for h in tail) / len(tail),
               "final_capacity": sum(h["capacity"] for h in tail) / len(tail),
               "first_lm_loss": hist[0]["lm_loss"] if hist else None}
    log(f"routers trained: {metrics}")
    return Patch(kind="router", base=base.ref(), spec=spec, tensors=kind.state(model),
                 provenance=provenance(task=task.name, seed=cfg.seed), metrics=metrics)
