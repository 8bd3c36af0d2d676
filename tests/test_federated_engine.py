"""Federated training moved onto the one training engine without changing a number: the client's local LoRA
training, DP-SGD and DP-Flat give tensors identical (torch.equal) to the loops they replaced, which are copied
below as reference functions from `git show af73a9d:src/patchlm/federated/flower/task.py` and
`...:src/patchlm/federated/privacy.py` (only their imports follow the modules' moves)."""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import attach_lora, toy_features

from patchlm.data.features import IGNORE, collate


# ---------------------------------------------------------------- reference: the old client loop (af73a9d)
def old_local_train(base, cfg, k, round_, examples, task):
    """af73a9d's local_train, plain (non-DP) branch."""
    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear
    from patchlm.data.features import build_features, objective_for
    from patchlm.federated.flower.task import init_lora_tensors, round_seed
    from patchlm.train.engine import causal_lm_loss

    r, alpha = cfg.rank(k), cfg.lora_alpha(k)
    seed = round_seed(cfg, round_)
    torch.manual_seed(seed * 131 + k)
    model = base.model
    init = init_lora_tensors(model, cfg.targets, r, seed)
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
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
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
    model.eval()
    tensors = kind.state(model)
    kind.detach(model)
    return tensors, sum(losses) / len(losses)


# ---------------------------------------------------------------- reference: the old DP loops (af73a9d)
def old_per_example_loss(model, batch):
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != IGNORE
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is not None and head is not None:
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep])
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    counts = keep.sum(1).clamp(min=1).to(tok.dtype)
    return sums / counts


def _old_sharpness(model, params, batch, rho, draws, gen, autocast):
    with torch.no_grad(), autocast():
        base = float(old_per_example_loss(model, batch).mean())
        tot = 0.0
        for _ in range(draws):
            noises = []
            for p in params:
                scale = rho * (float(p.detach().float().abs().mean()) + 1e-8)
                e = torch.randn(p.shape, generator=gen) * scale
                p.add_(e.to(p.dtype))
                noises.append(e)
            tot += float(old_per_example_loss(model, batch).mean())
            for p, e in zip(params, noises, strict=True):
                p.sub_(e.to(p.dtype))
    return tot / draws - base


def _old_flatness_layer_choice(model, modules, batch, keep, seed, autocast, rho=0.5, draws=2):
    from patchlm.federated.privacy import _layer_of

    layers: dict[str, list[str]] = {}
    for n in modules:
        layers.setdefault(_layer_of(n), []).append(n)
    if len(layers) <= 1:
        return sorted(layers)
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    gen = torch.Generator().manual_seed(seed)
    ref = _old_sharpness(model, params, batch, rho, draws, gen, autocast)
    hurt = {}
    for layer, names in layers.items():
        saved = [(modules[n].lora_B, modules[n].lora_B.detach().clone()) for n in names]
        with torch.no_grad():
            for b, _ in saved:
                b.zero_()
        gen = torch.Generator().manual_seed(seed)
        hurt[layer] = _old_sharpness(model, params, batch, rho, draws, gen, autocast) - ref
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    k = max(1, round(keep * len(layers)))
    return sorted(sorted(hurt, key=lambda lay: -hurt[lay])[:k])


def _old_make_dp_optimizer(base_opt, dp, batch_size, teacher, lam):
    from opacus.optimizers import DPOptimizer

    class _Opt(DPOptimizer):
        def pre_step(self, closure=None):
            ok = super().pre_step(closure)
            if ok and teacher:
                for p in self.params:
                    t = teacher.get(id(p))
                    if t is not None and p.grad is not None:
                        p.grad.add_((p.detach() - t) * (2 * lam))
            return ok

    return _Opt(base_opt, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                expected_batch_size=batch_size, loss_reduction="mean")


def _old_train_teacher(model, params, public_feats, pad_id, steps, batch_size, lr, seed, autocast):
    init = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr)
    device = next(model.parameters()).device
    order = list(range(len(public_feats)))
    random.Random(seed).shuffle(order)
    for s in range(steps):
        sel = [public_feats[order[(s * batch_size + j) % len(order)]] for j in range(batch_size)]
        batch = {k: v.to(device) for k, v in collate(sel, pad_id).items()}
        with autocast():
            loss = old_per_example_loss(model, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [(i, p.detach().clone()) for i, p in zip(init, params, strict=True)]


def old_dp_train(model, params, feats, pad_id, *, steps, batch_size, lr, dp, seed=0, bf16=False,
                 lora_modules=None, public_feats=None):
    """af73a9d's dp_train (without its log line)."""
    from opacus.accountants import RDPAccountant
    from opacus.grad_sample import GradSampleModule

    from patchlm.federated.privacy import _layer_of, default_delta

    n = len(feats)
    q = min(1.0, batch_size / n)
    delta = dp.delta if dp.delta is not None else default_delta(n)
    device = next(model.parameters()).device
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    record: dict = {"noise_multiplier": dp.noise_multiplier, "max_grad_norm": dp.max_grad_norm, "sample_rate": q,
                    "delta": delta}
    teacher = None
    if dp.flat:
        teacher_state = _old_train_teacher(model, params, public_feats, pad_id, dp.teacher_steps, batch_size, lr,
                                           seed, autocast)
        pub_batch = {k: v.to(device) for k, v in collate(public_feats[:batch_size], pad_id).items()}
        kept = _old_flatness_layer_choice(model, lora_modules, pub_batch, dp.flat_keep, seed, autocast)
        with torch.no_grad():
            for p, (init, _) in zip(params, teacher_state, strict=True):
                p.copy_(init)
        dropped = {id(m.lora_A) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        dropped |= {id(m.lora_B) for nme, m in lora_modules.items() if _layer_of(nme) not in kept}
        for p in params:
            if id(p) in dropped:
                p.requires_grad_(False)
        teacher = {id(p): t for p, (_, t) in zip(params, teacher_state, strict=True) if id(p) not in dropped}
        params = [p for p in params if id(p) not in dropped]
        record.update({"flat": True, "kept_layers": kept, "num_layers": len({_layer_of(x) for x in lora_modules})})

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = _old_make_dp_optimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), dp, batch_size, teacher,
                                 dp.flat_lambda)
    acc = RDPAccountant()
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=q))
    gen = torch.Generator().manual_seed(seed)
    prev_grad = None
    warm = int(dp.flat_warm * steps) if dp.flat else 0
    losses = []
    model.train()
    try:
        for step in range(steps):
            idx = (torch.rand(n, generator=gen) < q).nonzero()[:, 0].tolist()
            eps_added = None
            if dp.flat and step < warm and prev_grad is not None:
                eps_added = []
                with torch.no_grad():
                    for p, g in zip(params, prev_grad, strict=True):
                        gn = float(g.norm())
                        e = g * (dp.flat_gamma * float(p.norm()) / gn) if gn > 0 else torch.zeros_like(p)
                        p.add_(e)
                        eps_added.append(e)
            if idx:
                batch = {k: v.to(device) for k, v in collate([feats[i] for i in idx], pad_id).items()}
                with autocast():
                    loss = old_per_example_loss(model, batch).mean()
                loss.backward()
                losses.append(float(loss))
            else:
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if eps_added is not None:
                with torch.no_grad():
                    for p, e in zip(params, eps_added, strict=True):
                        p.sub_(e)
            opt.step()
            if dp.flat:
                prev_grad = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            opt.zero_grad(set_to_none=True)
    finally:
        gsm._close()
    record.update({"steps": steps, "epsilon": float(acc.get_epsilon(delta)) if dp.noise_multiplier > 0 else math.inf,
                   "train_loss": sum(losses) / max(1, len(losses))})
    return record


# ---------------------------------------------------------------- old vs engine
@pytest.mark.parametrize("aggregation", ["flora", "ffa"])
def test_local_train_on_the_engine_matches_the_old_loop(toy_task, aggregation):
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.task import local_train
    from patchlm.models import load_base

    # batch 7: a loss weighted 7 / 7 (make_closure's default weighting) would not be bit-identical in float32
    cfg = FedConfig(clients=2, ranks=[4, 2], local_steps=4, batch_size=7, lr=5e-3, max_length=64,
                    aggregation=aggregation, sign="none")
    for k in (0, 1):
        old, old_loss = old_local_train(load_base("tiny-random-llama"), cfg, k, 2, toy_task.train, toy_task)
        new, metrics = local_train(load_base("tiny-random-llama"), cfg, k, 2, toy_task.train, toy_task)
        assert sorted(old) == sorted(new)
        for name in old:
            assert torch.equal(old[name], new[name]), name
        assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in new.items() if n.endswith("lora_B"))
        assert metrics["train_loss"] == old_loss


def _dp_run(fn, toy_task, dp, *, steps, batch_size, flat=False, seed=3):
    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    params, mods = attach_lora(base, r=4)
    feats = toy_features(base, toy_task)
    torch.manual_seed(0)  # Opacus draws its noise from the global generator
    kw = {"lora_modules": mods, "public_feats": feats[:8]} if flat else {}
    rec = fn(base.model, params, feats, base.tokenizer.pad_token_id, steps=steps, batch_size=batch_size, lr=1e-2,
             dp=dp, seed=seed, **kw)
    return [p.detach().clone() for p in params], rec


@pytest.mark.parametrize("batch_size", [7, 1])  # 1: a sample rate of 1/32, so most Poisson batches are empty
def test_dp_sgd_on_the_engine_matches_the_old_loop(toy_task, batch_size):
    from patchlm.federated.privacy import DPConfig, dp_train

    dp = DPConfig(noise_multiplier=0.8, max_grad_norm=0.5)
    old, old_rec = _dp_run(old_dp_train, toy_task, dp, steps=6, batch_size=batch_size)
    new, new_rec = _dp_run(dp_train, toy_task, dp, steps=6, batch_size=batch_size)
    for a, b in zip(old, new, strict=True):
        assert torch.equal(a, b)
    assert new_rec == old_rec
    if batch_size == 1:  # the run had empty and non-empty Poisson batches
        gen = torch.Generator().manual_seed(3)
        sizes = [int((torch.rand(32, generator=gen) < 1 / 32).sum()) for _ in range(6)]
        assert 0 in sizes and max(sizes) > 0


def test_dp_flat_on_the_engine_matches_the_old_loop(toy_task):
    from patchlm.federated.privacy import DPConfig, dp_train

    dp = DPConfig(noise_multiplier=1.0, flat=True, flat_keep=0.5, teacher_steps=3)
    old, old_rec = _dp_run(old_dp_train, toy_task, dp, steps=5, batch_size=6, flat=True)
    new, new_rec = _dp_run(dp_train, toy_task, dp, steps=5, batch_size=6, flat=True)
    for a, b in zip(old, new, strict=True):
        assert torch.equal(a, b)
    # the record now also names the parts that ran (all three, the old loop's only mode)
    assert new_rec.pop("flat_parts") == "minmax,layers,distill"
    scores = new_rec.pop("layer_sharpness_change")  # and each layer's score of the flatness choice
    assert new_rec.pop("flat_score_dtype") == "float32"  # taken in float32 (this run is float32 throughout)
    assert len(scores) == new_rec["num_layers"]
    assert set(new_rec["kept_layers"]) == set(sorted(scores, key=lambda k: -scores[k])[:len(new_rec["kept_layers"])])
    assert new_rec == old_rec and new_rec["flat"]
