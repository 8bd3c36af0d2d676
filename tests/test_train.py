import json

import pytest
import torch

from patchlm.errors import ConfigError, OutputExistsError
from patchlm.patch import Patch
from patchlm.train import TrainConfig, Trainer
from patchlm.train.trainer import lr_at


def cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=5e-3, save_every=4, log_every=2, progress=False, eval_limit=8)
    base.update(kw)
    return TrainConfig(**base)


def test_training_changes_the_adapter_and_logs(tiny, toy_task, tmp_path):
    spec = {"r": 2, "alpha": 4, "targets": "attn"}
    patch = Trainer(tiny, "lora", spec, toy_task, cfg(), out_dir=tmp_path / "run").run()
    assert any(t.abs().sum() > 0 for k, t in patch.tensors.items() if k.endswith("lora_B"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [2, 4, 6, 8, 10, 12]
    assert any("val_accuracy" in x for x in lines)
    saved = Patch.load(tmp_path / "run" / "patch")
    assert saved.metrics["steps"] == 12 and "val_accuracy" in saved.metrics
    assert saved.provenance["task"] == "toy" and saved.spec["seed"] == 0


def test_loss_goes_down_on_an_easy_task(tiny, toy_task):
    from patchlm.evaluate.classify import evaluate_classification

    before = evaluate_classification(tiny.model, tiny.tokenizer, toy_task, split="train")["accuracy"]
    Trainer(tiny, "lora", {"r": 4, "alpha": 8}, toy_task, cfg(steps=40, lr=1e-2)).run()
    after = evaluate_classification(tiny.model, tiny.tokenizer, toy_task, split="train")["accuracy"]
    assert after > before and after >= 0.9


def test_resume_after_interruption_matches_uninterrupted(tiny, toy_task, tmp_path, monkeypatch):
    from patchlm.models import load_base

    spec = {"r": 2, "alpha": 4, "targets": "attn", "dropout": 0.1}
    full = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg(), out_dir=tmp_path / "a").run()

    import patchlm.train.trainer as tr

    calls = {"n": 0}
    real = tr.causal_lm_loss

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # die in the middle of step 11, after the step-8 checkpoint
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(tr, "causal_lm_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg(), out_dir=tmp_path / "b").run()
    state = json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 8
    assert not (tmp_path / "b" / "patch").exists()
    monkeypatch.setattr(tr, "causal_lm_loss", real)
    with pytest.raises(OutputExistsError):
        Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg(), out_dir=tmp_path / "b")
    resumed = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg(), out_dir=tmp_path / "b",
                      resume=True).run()
    for k in full.tensors:
        assert torch.allclose(full.tensors[k], resumed.tensors[k], atol=1e-6), k


def test_schedule_and_config_checks():
    c = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(99, c) < 0.01
    assert lr_at(50, TrainConfig(steps=100, lr=1.0, warmup=0, schedule="constant")) == 1.0
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=-1)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="cosinus")


def test_lm_and_chat_objectives(tiny):
    from patchlm.data.features import build_features
    from patchlm.data.task import Task

    text = Task(name="t", kind="text", train=[{"text": "hello world " * 50}] * 4, validation=[], test=[])
    feats = build_features(text, "train", tiny.tokenizer, "lm", 32)
    assert all(len(f["input_ids"]) == 32 and f["labels"] == f["input_ids"] for f in feats)
    chat = Task(name="c", kind="chat", train=[{"messages": [{"role": "user", "content": "Say hi"},
                                                            {"role": "assistant", "content": "Hi there!"}]}],
                validation=[], test=[])
    f = build_features(chat, "train", tiny.tokenizer, "chat", 128)[0]
    labelled = tiny.tokenizer.decode([i for i, l in zip(f["input_ids"], f["labels"]) if l != -100])
    assert "Hi there!" in labelled and "Say hi" not in labelled


# ---------------------------------------------------------------- the benchmarks' probe loops, now on the engine
def _bench(name: str):
    """A bench/ script as a module (bench is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lora_model(spec):
    from patchlm.models import load_base
    from patchlm.patch import get_kind

    base = load_base("tiny-random-llama")
    kind = get_kind("lora")
    kind.attach(base.model, dict(spec), seed=0)
    return base, kind.trainable_parameters(base.model)


def _batches(base, toy_task, n, bs=4):
    from patchlm.data.features import build_features, collate, pad_id

    feats = build_features(toy_task, "train", base.tokenizer, "classification", 64)
    return feats, [collate(feats[i * bs:(i + 1) * bs], pad_id(base.tokenizer)) for i in range(n)]


def test_adapters_probe_loop_is_the_old_loop(toy_task):
    """bench/adapters.py's throughput/memory probes train through train_loop exactly as their old hand loop did."""
    from patchlm.train.engine import causal_lm_loss

    spec = {"r": 2, "alpha": 4, "targets": "all-linear"}
    base, params = _lora_model(spec)
    _, batches = _batches(base, toy_task, 3)
    # the old loop (git show af73a9d:bench/adapters.py, speed_probe)
    opt = torch.optim.AdamW(params, lr=1e-4)
    base.model.train()
    for b in [batches[0], *batches]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(base.model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    new_base, new_params = _lora_model(spec)
    assert _bench("adapters").probe_train(new_base.model, new_params, [batches[0], *batches]) == 4
    assert any(not torch.equal(p, q) for p, q in zip(params, _lora_model(spec)[1]))  # it trained
    for p, q in zip(params, new_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bf16", [True, False])
def test_foundation_speed_loop_is_the_old_loop(toy_task, bf16):
    """bench/foundation.py's speed runs train through train_loop exactly as their old hand loop did."""
    from patchlm.data.features import collate, pad_id
    from patchlm.train.engine import causal_lm_loss

    spec = {"r": 2, "alpha": 4, "targets": "all-linear"}
    base, params = _lora_model(spec)
    feats, _ = _batches(base, toy_task, 0)
    batch, steps, pad = 4, 2, pad_id(base.tokenizer)
    # the old loop (git show af73a9d:bench/foundation.py, speed_worker)
    opt = torch.optim.AdamW(params, lr=1e-4)
    base.model.train()
    def ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def step(i):
        b = collate(feats[i * batch:(i + 1) * batch], pad)
        with ctx():
            loss, _ = causal_lm_loss(base.model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum())

    for i in range(3):
        step(i)
    tokens = sum(step(i) for i in range(3, steps + 3))
    new_base, new_params = _lora_model(spec)
    new_tokens, secs, _ = _bench("foundation").timed_training(new_base.model, new_params, feats, pad, batch, steps,
                                                               bf16)
    assert new_tokens == tokens and secs > 0
    for p, q in zip(params, new_params):
        assert torch.equal(p, q)
