"""MC-SMoE (Merge, then Compress; ICLR 2024) on Mixtral-style MoE checkpoints with transformers 5's fused experts.

1. Routing statistics on task data: each expert's top-k usage frequency per layer and the cosine similarity of the
   experts' router-logit columns over the calibration tokens (`routing_stats`).
2. Grouping: the most used experts are dominant, every other one joins its most similar dominant (`group_layer`);
   a global usage threshold can give each layer its own group count (`group_counts`, layer_groups="adaptive").
3. Alignment: each member's SwiGLU neurons are permuted to its dominant by weight matching (scipy's
   linear_sum_assignment; gate and up rows and down columns together: the expert's function is unchanged).
4. Merging: each group becomes one expert, averaged with usage-frequency weights; the expert set is REBUILT with
   one expert per group and the router rows remapped (dominant's row or usage-weighted mean), so the checkpoint
   really shrinks and loads in plain transformers (tied copies of a merged expert would save nothing).
5. Compression: each merged expert matrix as low rank + sparse (patchlm.moe.losparse), pruned by |w x grad| on a
   cubic schedule during recovery (distillation from the uncompressed MoE: CE + kd_weight x KL at temperature T,
   through the engine's train_loop), or in one shot from calibration gradients without recovery.
Baselines run the same code: merge_weights="uniform", align=False, method="prune", and each stage alone.

An expert that the calibration data never routes to is refused (it has no usage to weigh it by) unless
allow_unused: then it is never dominant and joins its most similar dominant with merge weight 0 (it is dropped).
A group whose members were all unused (more groups than used experts) is averaged uniformly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from patchlm.errors import ConfigError, PatchFormatError
from patchlm.moe.config import CompressConfig
from patchlm.moe.losparse import bake, check_growth, cubic_sparsity, factored_parameters, factored_params, factorize

Log = Callable[[str], None]


# ---------------------------------------------------------------- the MoE and its experts
def moe_layers(model: torch.nn.Module, what: str = "the model") -> list[torch.nn.Module]:
    """The sparse MoE blocks of a Mixtral-style model (router `gate`, fused `experts`); refuses a model without."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    blocks = [getattr(layer, "mlp", None) for layer in (layers or [])]
    if not blocks or not all(hasattr(b, "experts") and hasattr(b.experts, "gate_up_proj")
                             and hasattr(b, "gate") for b in blocks):
        raise ConfigError(f"{what} ({arch}) has no experts: MC-SMoE compresses a Mixtral-style MoE (fused "
                          "mlp.experts.gate_up_proj / down_proj and a router mlp.gate per layer), e.g. one written "
                          "by `patchlm moe upcycle`")
    return blocks


def load_moe(path: str | Path):
    """(model, tokenizer) of a Mixtral checkpoint directory, in float32 (merging and SVD need it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from patchlm.models.base import refuse_pickled_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a checkpoint directory (no config.json)")
    cfg = AutoConfig.from_pretrained(path)
    if not getattr(cfg, "num_local_experts", None):
        arch = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
        raise ConfigError(f"{path} ({arch}) has no experts: MC-SMoE compresses a Mixtral-style MoE (num_local_experts"
                          " in config.json), e.g. one written by `patchlm moe upcycle`")
    refuse_pickled_weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)  # no pickle
    model.eval()
    moe_layers(model, str(path))
    return model, AutoTokenizer.from_pretrained(path)


def expert_params(model: torch.nn.Module) -> int:
    """Parameters held by the experts (every layer's fused tensors; routers not included)."""
    return sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for b in moe_layers(model))


# ---------------------------------------------------------------- 1. routing statistics
@dataclass
class RoutingStats:
    """Per layer: top-k selections of each expert, tokens seen, and the Gram matrix of the router logits."""

    counts: torch.Tensor      # [L, E] top-k selections
    gram: torch.Tensor        # [L, E, E] sum over tokens of logits logits^T
    tokens: int
    top_k: int

    @property
    def usage(self) -> torch.Tensor:
        """[L, E] usage frequency: the share of top-k selections that went to each expert (rows sum to 1)."""
        return self.counts / max(1, self.tokens * self.top_k)

    @property
    def logit_similarity(self) -> torch.Tensor:
        """[L, E, E] cosine similarity of the experts' router-logit columns over the calibration tokens."""
        d = self.gram.diagonal(dim1=-2, dim2=-1).clamp(min=1e-12).sqrt()
        return self.gram / (d.unsqueeze(-1) * d.unsqueeze(-2))

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "top_k": self.top_k,
                "usage": [[round(float(x), 6) for x in row] for row in self.usage]}


def calibration_batches(tokenizer, tasks: Sequence[str], cfg: CompressConfig) -> list[dict]:
    """Collated batches of the tasks' first calib_examples training features each (their own objectives)."""
    from patchlm.data.features import collate, pad_id
    from patchlm.moe.train import mixed_features

    feats = mixed_features(tokenizer, tasks, cfg.max_length, cfg.calib_examples)
    if not feats:
        raise ConfigError(f"tasks {', '.join(tasks)} give no calibration examples", field="calib_examples")
    pad = pad_id(tokenizer)
    return [collate(feats[i:i + cfg.batch_size], pad) for i in range(0, len(feats), cfg.batch_size)]


@torch.no_grad()
def routing_stats(model: torch.nn.Module, batches: Sequence[dict]) -> RoutingStats:
    """Run the batches and count, per layer, each expert's top-k selections over non-padding tokens."""
    from patchlm.models.parts import model_device

    blocks = moe_layers(model)
    E, k = int(model.config.num_local_experts), int(model.config.num_experts_per_tok)
    counts = torch.zeros(len(blocks), E, dtype=torch.float64)
    gram = torch.zeros(len(blocks), E, E, dtype=torch.float64)
    state = {"mask": None}

    def hook(i):
        def fn(_module, _inputs, out):
            logits, _scores, idx = out
            keep = state["mask"]
            lg, ix = logits.detach().double()[keep], idx[keep]
            counts[i] += torch.bincount(ix.reshape(-1).cpu(), minlength=E).double()
            gram[i] += (lg.T @ lg).cpu()
        return fn

    handles = [b.gate.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    dev, tokens = model_device(model), 0
    was = model.training
    model.eval()
    try:
        for b in batches:
            mask = b["attention_mask"].to(dev)
            state["mask"] = mask.reshape(-1).bool()
            tokens += int(mask.sum())
            model(input_ids=b["input_ids"].to(dev), attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return RoutingStats(counts=counts, gram=gram, tokens=tokens, top_k=k)


# ---------------------------------------------------------------- 2. permutation alignment
def expert_weights(block, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2f, h], down [h, f]) of expert e of a fused block."""
    return block.experts.gate_up_proj[e].detach(), block.experts.down_proj[e].detach()


def align_permutation(ref: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
    """perm with other's neuron perm[j] moved to position j, maximising sum_j <ref_j, other_perm[j]> over the
    gate rows, up rows and down columns together (weight matching by linear assignment)."""
    from scipy.optimize import linear_sum_assignment

    (gu_r, d_r), (gu, d) = ref, other
    f = d.shape[1]
    cost = gu_r[:f] @ gu[:f].T + gu_r[f:] @ gu[f:].T + d_r.T @ d  # [f, f]
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy(), maximize=True)
    perm = torch.empty(f, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same SwiGLU expert with its neurons reordered: gate and up rows and down columns by `perm`."""
    f = down.shape[1]
    return torch.cat([gate_up[:f][perm], gate_up[f:][perm]]), down[:, perm]


# ---------------------------------------------------------------- 3. grouping
def group_counts(usage: torch.Tensor, groups: float, adaptive: bool) -> list[int]:
    """Groups per layer: `groups` in every layer, or (adaptive) one global threshold over the usage frequencies:
    each layer keeps its most used expert, then the round(groups x L) - L globally most used others are kept."""
    L, E = usage.shape
    if not adaptive:
        return [round(groups)] * L
    total = min(L * E, max(L, round(groups * L)))
    out = [1] * L
    order = usage.argsort(dim=1, descending=True)
    rest = sorted(((float(usage[i, order[i, j]]), -i, -j, i) for i in range(L) for j in range(1, E)), reverse=True)
    for _u, _, _, i in rest[: total - L]:
        out[i] += 1
    return out


def group_layer(usage: Sequence[float], count: int, similarity: Callable[[int, int], float]) -> list[list[int]]:
    """Groups of one layer, each [dominant, members...]: the `count` most used experts are dominant (ties: lower
    index), every other expert joins the dominant it is most similar to (similarity(expert, dominant))."""
    E = len(usage)
    order = sorted(range(E), key=lambda e: (-usage[e], e))
    dominants = order[:count]
    groups = {d: [d] for d in dominants}
    for e in order[count:]:
        best = max(dominants, key=lambda d: (similarity(e, d), -dominants.index(d)))
        groups[best].append(e)
    return [groups[d] for d in dominants]


# ---------------------------------------------------------------- 4. merging and rebuilding
def merge_experts(experts: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted average of (already aligned) experts; all-zero weights fall back to the plain average."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(w))
    gu = sum(float(a) * e[0].double() for a, e in zip(w, experts))
    d = sum(float(a) * e[1].double() for a, e in zip(w, experts))
    return gu.float(), d.float()


@dataclass
class Plan:
    """Per layer, the groups [dominant, members...] and each expert's merge weight."""

    groups: list[list[list[int]]]
    weights: list[list[float]]          # [L][E]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"groups": self.groups, "counts": [len(g) for g in self.groups], "notes": self.notes}


def resolve_groups(cfg: CompressConfig, E: int) -> float | None:
    """The (average) group count per layer the config asks for, checked against the expert count."""
    if cfg.groups is not None:
        if cfg.groups > E:
            raise ConfigError(f"groups {cfg.groups} is above the model's {E} experts per layer", field="groups")
        return float(cfg.groups)
    if cfg.keep is not None:
        return max(1.0, cfg.keep * E)
    return None


def plan_merge(model: torch.nn.Module, stats: RoutingStats, cfg: CompressConfig, log: Log | None = None) -> Plan:
    """Groups of every layer from the routing statistics (see group_layer, group_counts) and merge weights."""
    blocks = moe_layers(model)
    E = int(model.config.num_local_experts)
    target = resolve_groups(cfg, E)
    usage = stats.usage
    notes = []
    unused = [(i, e) for i in range(len(blocks)) for e in range(E) if stats.counts[i, e] == 0]
    if unused:
        where = ", ".join(f"expert {e} of layer {i}" for i, e in unused[:3]) + (" ..." if len(unused) > 3 else "")
        if not cfg.allow_unused:
            raise ConfigError(f"the calibration data routes no token to {where} ({len(unused)} unused of "
                              f"{len(blocks) * E}, {stats.tokens} tokens): give more or other task data, or accept "
                              "it with allow_unused (it then joins its most similar dominant with merge weight 0)",
                              field="allow_unused")
        notes.append(f"{len(unused)} unused experts ({where}) merged with weight 0")
    counts = group_counts(usage, target if target is not None else E, cfg.layer_groups == "adaptive")
    sim = stats.logit_similarity
    groups, weights = [], []
    for i, b in enumerate(blocks):
        if cfg.similarity == "router-logits":
            def similarity(e, d, i=i):
                return float(sim[i, e, d])
        else:
            def similarity(e, d, b=b):
                ref, other = expert_weights(b, d), expert_weights(b, e)
                if cfg.align:
                    other = permute_expert(*other, align_permutation(ref, other))
                a = torch.cat([ref[0].reshape(-1), ref[1].reshape(-1)])
                o = torch.cat([other[0].reshape(-1), other[1].reshape(-1)])
                return float(F.cosine_similarity(a, o, dim=0))
        groups.append(group_layer([float(x) for x in usage[i]], counts[i], similarity))
        weights.append([float(x) for x in usage[i]] if cfg.merge_weights == "usage" else [1.0] * E)
    if log:
        log(f"groups per layer: {[len(g) for g in groups]}")
    return Plan(groups=groups, weights=weights, notes=notes)


@torch.no_grad()
def rebuild(model: torch.nn.Module, plan: Plan, cfg: CompressConfig, alignment: dict | None = None
            ) -> torch.nn.Module:
    """A new Mixtral with one expert per group (merged or, method=prune, the dominant alone) and the router rows
    remapped; layers with fewer groups than the largest layer (adaptive counts) repeat their most used group.
    `alignment`, when given, receives how many neurons the alignment permutations moved ("neurons" aligned,
    "moved" off their own position): experts upcycled from one base are often aligned already."""
    from patchlm.moe.upcycle import build_mixtral

    blocks = moe_layers(model)
    M = max(len(g) for g in plan.groups)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, (b, groups) in enumerate(zip(blocks, plan.groups)):
        ups, downs, rows = [], [], []
        router = b.gate.weight.detach().float()
        w = plan.weights[i]
        for g in groups:
            members = g[:1] if cfg.method == "prune" else g
            ref = expert_weights(b, g[0])
            ex = [ref]
            for e in members[1:]:
                other = expert_weights(b, e)
                if cfg.align:
                    perm = align_permutation(ref, other)
                    if alignment is not None:
                        alignment["neurons"] = alignment.get("neurons", 0) + perm.numel()
                        alignment["moved"] = alignment.get("moved", 0) + int((perm != torch.arange(perm.numel()))
                                                                             .sum())
                    other = permute_expert(*other, perm)
                ex.append(other)
            gu, d = merge_experts(ex, [w[e] for e in members])
            ups.append(gu)
            downs.append(d)
            if cfg.router_rows == "weighted" and len(members) > 1:
                mw = torch.tensor([w[e] for e in members], dtype=torch.float32)
                mw = mw / mw.sum() if mw.sum() > 0 else torch.full_like(mw, 1 / len(members))
                rows.append((mw[:, None] * router[members]).sum(0))
            else:
                rows.append(router[g[0]])
        while len(ups) < M:
            ups.append(ups[0].clone())
            downs.append(downs[0].clone())
            rows.append(rows[0].clone())
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack(ups)
        state[p + "experts.down_proj"] = torch.stack(downs)
        state[p + "gate.weight"] = torch.stack(rows)
    config = copy.deepcopy(model.config)
    config.num_local_experts = M
    config.num_experts_per_tok = min(int(model.config.num_experts_per_tok), M)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    dt = next(model.parameters()).dtype
    return build_mixtral(config, {k: v.to(dt).contiguous() for k, v in state.items()})


# ---------------------------------------------------------------- 5. compression and recovery
def distill_loss(teacher: torch.nn.Module, kd_weight: float, temperature: float):
    """loss_fn(model, batch): CE on the labelled positions + kd_weight x T^2 x KL(teacher_T || student_T)."""
    from patchlm.data.features import IGNORE
    from patchlm.models.parts import backbone_and_head

    def labelled(m, batch, keep):
        backbone, head = backbone_and_head(m)
        if backbone is None:
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        h = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return head(h[:, :-1][keep])

    def loss_fn(model, batch):
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        n = int(keep.sum())
        if n == 0:
            raise ConfigError("a recovery batch has no labelled tokens", field="max_length")
        s = labelled(model, batch, keep).float()
        ce = F.cross_entropy(s, target[keep])
        if kd_weight == 0:
            return ce, n
        with torch.no_grad():
            t = labelled(teacher, batch, keep).float()
        T = temperature
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
        return ce + kd_weight * T * T * kl, n

    return loss_fn


def check_compression(model: torch.nn.Module, cfg: CompressConfig) -> None:
    c = model.config
    for o, i in ((c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)):
        if cfg.low_rank > 0:
            check_growth(o, i, cfg.low_rank, cfg.sparsity)


def compressed_expert_params(model: torch.nn.Module, cfg: CompressConfig) -> int:
    """Expert parameters of the low-rank + sparse form (what a factored kernel holds) at the target sparsity."""
    c = model.config
    h, f, M, L = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_hidden_layers
    per = 2 * factored_params(f, h, cfg.low_rank, cfg.sparsity) + factored_params(h, f, cfg.low_rank, cfg.sparsity)
    return per * M * L


def one_shot_importance(model, batches: Sequence[dict], bf16: bool) -> None:
    """Accumulate |S x grad| from calibration gradients (no recovery: the importance of one-shot pruning)."""
    from patchlm.models.parts import model_device
    from patchlm.train.engine import causal_lm_loss, make_closure, to_device

    dev = model_device(model)
    model.train()
    try:
        for b in batches:  # the engine's closure: its backward feeds the importance hooks; nothing steps
            make_closure(model, [to_device(b, dev)], causal_lm_loss, bf16)(backward=True)
            model.zero_grad(set_to_none=True)
    finally:
        model.eval()


def recover(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, tasks: Sequence[str],
            cfg: CompressConfig, parts: list, progress: bool = False, log: Log | None = None) -> dict:
    """Distil the compressed MoE from the uncompressed one for cfg.recover steps (routers and compressed experts
    train), pruning the sparse parts on the cubic schedule; returns the loss curve's ends."""
    from patchlm.data.features import collate, pad_id
    from patchlm.moe.train import mixed_features, router_parameters
    from patchlm.train import TrainConfig
    from patchlm.train.engine import train_loop, unit_count
    from patchlm.train.optim import make_optimizer

    feats = mixed_features(tokenizer, tasks, cfg.max_length, cfg.batch_size * cfg.recover)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(feats), generator=gen).tolist()
    pad = pad_id(tokenizer)

    def batches(step: int):
        return [collate([feats[order[(step * cfg.batch_size + j) % len(order)]] for j in range(cfg.batch_size)],
                        pad)]

    for p in student.parameters():
        p.requires_grad_(False)
    experts = factored_parameters(parts) if parts else \
        [q for b in moe_layers(student) for q in (b.experts.gate_up_proj, b.experts.down_proj)]
    params = router_parameters(student) + experts
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tcfg = TrainConfig(steps=cfg.recover, lr=cfg.lr, batch_size=cfg.batch_size, max_length=cfg.max_length,
                       seed=cfg.seed, progress=progress)
    rule = make_optimizer("adamw", params, tcfg, student)
    losses: list[float] = []

    def on_step(info):
        losses.append(info.loss)
        s = cubic_sparsity(info.step, cfg.recover, cfg.sparsity, cfg.prune_end)
        for p in parts:
            p.prune(s)

    try:
        train_loop(student, rule, batches, cfg.recover, loss_fn=distill_loss(teacher, cfg.kd_weight, cfg.temperature),
                   bf16=cfg.bf16, count=unit_count, on_step=on_step, progress=progress, desc="recover")
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    if log and losses:
        log(f"recovery: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"steps": cfg.recover, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


# ---------------------------------------------------------------- the pipeline
@dataclass
class Compressed:
    model: torch.nn.Module
    report: dict


def compress(model: torch.nn.Module, tokenizer, tasks: Sequence[str], cfg: CompressConfig | None = None, *,
             progress: bool = False, log: Log | None = None) -> Compressed:
    """The whole MC-SMoE pipeline on a Mixtral model (left unchanged: it is the teacher); returns the new model."""
    cfg = cfg or CompressConfig()
    log = log or (lambda _: None)
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ConfigError("MC-SMoE needs task data for its routing statistics: give at least one task")
    blocks = moe_layers(model)
    E = int(model.config.num_local_experts)
    resolve_groups(cfg, E)
    if cfg.compresses:
        check_compression(model, cfg)
    before = expert_params(model)
    report: dict = {"tasks": list(tasks), "experts_before": E, "expert_params_before": before,
                    "config": {k: v for k, v in vars(cfg).items()}}
    batches = calibration_batches(tokenizer, tasks, cfg)
    student = model
    if resolve_groups(cfg, E) is not None:
        log(f"routing statistics on {sum(len(b['input_ids']) for b in batches)} examples")
        stats = routing_stats(model, batches)
        plan = plan_merge(model, stats, cfg, log=log)
        aligned: dict = {}
        student = rebuild(model, plan, cfg, alignment=aligned)
        if aligned:
            report["alignment"] = {**aligned, "moved_fraction": aligned["moved"] / max(1, aligned["neurons"])}
        report["routing"] = stats.to_json()
        report["plan"] = plan.to_json()
    else:
        student = copy.deepcopy(model)
    report["experts_after"] = int(student.config.num_local_experts)
    report["expert_params_merged"] = expert_params(student)
    parts: list = []
    if cfg.compresses:
        parts = factorize(student, cfg.low_rank, cfg.importance_beta)
    if cfg.recover:
        report["recovery"] = recover(student, model, tokenizer, tasks, cfg, parts, progress=progress, log=log)
    if parts:
        if not cfg.recover:
            log("one-shot pruning from calibration gradients")
            for p in factored_parameters(parts):
                p.requires_grad_(True)
            one_shot_importance(student, batches, cfg.bf16)
            for p in factored_parameters(parts):
                p.requires_grad_(False)
        for p in parts:
            p.prune(cfg.sparsity)
        report["expert_params_factored"] = sum(p.params() for p in parts)
        bake(student)
    report["expert_params"] = report.get("expert_params_factored", report["expert_params_merged"])
    report["expert_memory_reduction"] = 1 - report["expert_params"] / before
    for b in moe_layers(student):
        for p in (b.experts.gate_up_proj, b.experts.down_proj):
            if not torch.isfinite(p).all():
                raise PatchFormatError("the compressed experts hold non-finite values: lower lr or give recover 0")
    del blocks
    return Compressed(student, report)


def flops_per_token(config, expert_macs: int | None = None) -> int:
    """2 x multiply-accumulates per token of the weight matmuls (attention projections, router, top_k experts,
    head); expert_macs overrides one expert's (3 h f dense); attention scores are left out (length dependent)."""
    h, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attn = h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    router = h * config.num_local_experts
    experts = config.num_experts_per_tok * (expert_macs if expert_macs is not None else 3 * h * f)
    return 2 * (L * (attn + router + experts) + h * V)


def save_compressed(result: Compressed, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Write the smaller Mixtral (fused keys, plain transformers) with its report, atomically."""
    from patchlm.moe.upcycle import write_mixtral

    return write_mixtral(result.model, tokenizer, out, force=force,
                         extra={"patchlm_mcsmoe.json": json.dumps(result.report, indent=2, default=str) + "\n"})
