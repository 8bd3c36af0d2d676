"""The one training engine: the loop and step rules give the numbers the old hand-written loop gave, state round
trips exactly through safetensors + JSON, and bad numbers stop training."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import killed_after, old_causal_lm_loss

from patchlm.data.features import IGNORE, build_features, collate, pad_id
from patchlm.errors import ConfigError, PatchFormatError, TrainingDiverged, UnknownNameError
from patchlm.train import TrainConfig, Trainer
from patchlm.train.checkpoint import load_state, save_state
from patchlm.train.engine import causal_lm_loss, example_count, example_mean_loss, per_example_loss, train_loop
from patchlm.train.optim import StepRule, make_optimizer, optimizers, register_optimizer
from patchlm.train.trainer import lr_at


# ---------------------------------------------------------------- the pre-engine loop, kept as the reference
def _old_train(base, task, spec, cfg):
    """The training loop of patchlm before the engine (train/trainer.py at af73a9d), without I/O."""
    from patchlm.patch import get_kind

    kind = get_kind("lora")
    spec = dict(spec, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    feats = build_features(task, "train", base.tokenizer, "classification", cfg.max_length)
    model = base.model
    kind.attach(model, spec, None, seed=cfg.seed)
    params = kind.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, bs = len(feats), cfg.batch_size
    state = {"epoch": None, "perm": None}

    def batch(micro_index):
        out = []
        for k in range(micro_index * bs, micro_index * bs + bs):
            epoch, pos = divmod(k, n)
            if epoch != state["epoch"]:
                state["perm"] = list(range(n))
                random.Random(cfg.seed * 100003 + epoch).shuffle(state["perm"])
                state["epoch"] = epoch
            out.append(feats[state["perm"][pos]])
        return out

    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        micro = [collate(batch(step * cfg.grad_accum + j), pad_id(base.tokenizer)) for j in range(cfg.grad_accum)]
        total = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        for b in micro:
            loss, k = old_causal_lm_loss(model, b)
            (loss * k / total).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return kind.state(model)


def _cfg(**kw):
    base = dict(steps=7, batch_size=4, grad_accum=2, lr=5e-3, warmup=2, progress=False, eval_limit=4, save_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_engine_adamw_gives_the_old_loops_weights_bit_for_bit(toy_task):
    from patchlm.models import load_base

    spec = {"r": 2, "alpha": 4, "targets": "attn", "dropout": 0.1}
    old = _old_train(load_base("tiny-random-llama"), toy_task, spec, _cfg())
    new = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, _cfg()).run().tensors
    assert old.keys() == new.keys()
    for k in old:
        assert torch.equal(old[k], new[k]), k


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_is_exact_for_every_rule(toy_task, tmp_path, optimizer):
    from patchlm.models import load_base

    spec = {"r": 2, "alpha": 4, "targets": "attn"}
    cfg = _cfg(optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, steps=6, grad_accum=1)
    full = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg).run().tensors
    half = TrainConfig(**{**cfg.to_dict(), "steps": 6})
    t = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, half, out_dir=tmp_path / "r")
    with killed_after(3):  # killed after the step-3 checkpoint
        t.run()
    saved = load_state(tmp_path / "r" / "checkpoints" / "last", "optimizer")
    assert saved["name"] == optimizer
    resumed = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, half, out_dir=tmp_path / "r",
                      resume=True).run().tensors
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # resuming with another optimizer is refused by name
    other = "sgd" if optimizer == "adamw" else "adamw"
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task,
                TrainConfig(**{**half.to_dict(), "optimizer": other, "steps": 8}), out_dir=tmp_path / "r",
                resume=True).run()


def test_state_round_trip_keeps_int_keys_tensors_and_scalars(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.95))
    p.grad = torch.randn(3, 2)
    opt.step()
    tree = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "inf": math.inf, "list": [1, "a", None]}
    save_state(tmp_path, "s", tree)
    assert "__tensor__" in (tmp_path / "s.json").read_text()
    json.loads((tmp_path / "s.json").read_text())  # strict JSON
    back = load_state(tmp_path, "s")
    assert back["inf"] == math.inf and back["list"] == [1, "a", None]
    assert torch.equal(back["rng"], tree["rng"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["betas"] == [0.8, 0.95] or tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(PatchFormatError, match="damaged"):
        load_state(tmp_path, "s")
    with pytest.raises(PatchFormatError, match="start over"):
        load_state(tmp_path / "nowhere", "s")
    with pytest.raises(TypeError):
        save_state(tmp_path, "bad", {"x": object()})


def test_a_non_finite_loss_stops_training(tiny, toy_task):
    cfg = _cfg(lr=1e30, steps=30, grad_accum=1, max_grad_norm=0.0, warmup=0)
    with pytest.raises(TrainingDiverged, match="lr"):
        Trainer(tiny, "lora", {"r": 2, "alpha": 4, "targets": "attn"}, toy_task, cfg).run()


def test_registry_and_custom_rule_plug_into_the_loop(tiny, toy_task):
    assert {"adamw", "sgd"} <= set(optimizers())
    with pytest.raises(UnknownNameError, match="adamw"):
        make_optimizer("adamx", [torch.nn.Parameter(torch.zeros(1))], _cfg())
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="adamx")

    calls = []

    @register_optimizer("test-sign-descent")
    class SignDescent(StepRule):
        """A forward-and-backward rule written in a few lines, to show the protocol."""

        def step(self, closure):
            loss = closure(backward=True)
            with torch.no_grad():
                for p in self.params:
                    p.sub_(self.lr * p.grad.sign())
                    p.grad = None
            calls.append(loss)
            return loss

        def set_lr(self, lr):
            self.lr = lr

    try:
        Trainer(tiny, "lora", {"r": 2, "alpha": 4, "targets": "attn"}, toy_task,
                _cfg(optimizer="test-sign-descent", grad_accum=1)).run()
        assert len(calls) == 7 and all(math.isfinite(c) for c in calls)
    finally:
        from patchlm.train import optim

        optim._RULES.pop("test-sign-descent")


def test_closure_weights_and_per_example_loss(tiny, toy_task):
    feats = build_features(toy_task, "train", tiny.tokenizer, "classification", 64)[:6]
    b = collate(feats, pad_id(tiny.tokenizer))
    mean, n = causal_lm_loss(tiny.model, b)
    per = per_example_loss(tiny.model, b)
    assert per.shape == (6,) and n == 6  # one verbalizer token per example
    assert torch.allclose(per.mean(), mean, atol=1e-6)
    em, k = example_mean_loss(tiny.model, b)
    assert k == example_count(b) == 6 and torch.allclose(em, per.mean())
    # the loop with a DP-style loss and count runs, and an empty batch list is a no-op step reporting nan
    seen = []

    class Record(StepRule):
        def step(self, closure):
            v = closure(backward=False)
            seen.append(v)
            return v

        def set_lr(self, lr):
            pass

    params = [p for p in tiny.model.parameters()][:1]
    train_loop(tiny.model, Record(params, None), lambda s: [b] if s == 0 else [], 2, loss_fn=example_mean_loss,
               count=example_count)
    assert seen[0] == pytest.approx(float(per.mean().detach()), abs=1e-5) and math.isnan(seen[1])


@pytest.mark.parametrize("kw,field", [({"lr": float("inf")}, "lr"), ({"lr": float("nan")}, "lr"),
                                      ({"steps": 3.7}, "steps"), ({"bf16": "yes please"}, "bf16"),
                                      ({"steps": True}, "steps"), ({"warmup": float("nan")}, "warmup"),
                                      ({"optimizer": 3}, "optimizer")])
def test_train_config_refuses_wrong_types_and_non_finite_numbers(kw, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert e.value.field == field


def test_train_config_takes_integral_floats_from_yaml():
    c = TrainConfig(steps=10.0, lr=1)
    assert c.steps == 10 and isinstance(c.steps, int) and isinstance(c.lr, float)


def test_resume_refuses_another_task_spec_or_base_by_name(toy_task, tmp_path):
    from patchlm.models import load_base

    spec = {"r": 2, "alpha": 4, "targets": "attn"}
    cfg = _cfg(steps=6, grad_accum=1)
    with killed_after(3):
        Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg, out_dir=tmp_path / "r").run()
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    other_task = type(toy_task)(**{**toy_task.__dict__, "name": "other"})
    with pytest.raises(ConfigError, match="task"):
        Trainer(load_base("tiny-random-llama"), "lora", dict(spec), other_task, cfg, out_dir=tmp_path / "r",
                resume=True)
    with pytest.raises(ConfigError, match=r"spec \(r\)"):
        Trainer(load_base("tiny-random-llama"), "lora", {**spec, "r": 4}, toy_task, cfg, out_dir=tmp_path / "r",
                resume=True)
    with pytest.raises(ConfigError, match="method"):
        Trainer(load_base("tiny-random-llama"), "mos", {}, toy_task, cfg, out_dir=tmp_path / "r", resume=True)
    changed = load_base("tiny-random-llama")
    with torch.no_grad():
        next(changed.model.parameters()).add_(1.0)
    changed.fingerprint = "another"
    with pytest.raises(ConfigError, match="fingerprint"):
        Trainer(changed, "lora", dict(spec), toy_task, cfg, out_dir=tmp_path / "r", resume=True)
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before  # nothing written or removed
    done = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg, out_dir=tmp_path / "r",
                   resume=True).run()
    assert done.metrics["steps"] == 6
