"""CLI: drop score/apply, skip train/stats, stacking with LoRA patches in eval, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from patchlm.patch import Patch


def _lora_patch(tiny, path):
    """A LoRA patch with non-zero B (so it changes the outputs)."""
    from patchlm.adapters.lora import LoraKind

    kind = LoraKind()
    spec = {"r": 2, "alpha": 4, "targets": "all-linear"}
    kind.attach(tiny.model, spec, seed=0)
    tensors = kind.state(tiny.model)
    g = torch.Generator().manual_seed(1)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.2 if k.endswith("lora_B") else v) for k, v in tensors.items()}
    kind.detach(tiny.model)
    Patch(kind="lora", base=tiny.ref(), spec=spec, tensors=tensors).save(path)
    return path


def test_drop_score_json(capsys):
    code, out, err = run_cli(["drop", "score", "-m", "tiny-random-llama", "--samples", "2", "--seq-len", "32",
                              "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert set(d) == {"attention", "mlp", "block"} and all(len(v) == 4 for v in d.values())
    assert all(-1.0 <= x <= 1.0 for v in d.values() for x in v)


def test_drop_apply_eval_and_stack_with_lora(tiny, tmp_path, capsys):
    lora = _lora_patch(tiny, tmp_path / "lora")
    code, out, err = run_cli(["drop", "apply", "-m", "tiny-random-llama", "--attn", "2", "--samples", "2",
                              "--seq-len", "32", "--patch", str(lora), "--out", str(tmp_path / "d"), "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert len(plan["attention"]) == 2 and plan["method"] == "one-shot"
    p = Patch.load(tmp_path / "d")
    assert p.kind == "drop" and p.spec["scored_with_patches"] == [str(lora)]
    # the drop patch is given first on the command line; eval applies the LoRA patch first anyway
    args = ["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "--limit", "8", "--json"]
    code, out, err = run_cli([*args, "--patch", str(tmp_path / "d"), "--patch", str(lora)], capsys)
    assert code == 0, err
    stacked = json.loads(out)
    from patchlm.data import load_task
    from patchlm.evaluate import evaluate

    Patch.load(lora).apply(tiny)
    p.apply(tiny)
    want = evaluate(tiny.model, tiny.tokenizer, load_task("sms_spam"), limit=8)
    assert stacked["accuracy"] == want["accuracy"] and stacked["n"] == 8


def test_drop_apply_blocks_export_hf(tmp_path, capsys):
    code, _, err = run_cli(["drop", "apply", "-m", "tiny-random-llama", "--blocks", "1", "--method", "consecutive",
                              "--samples", "2", "--seq-len", "32", "--out", str(tmp_path / "b"),
                              "--export-hf", str(tmp_path / "hf"), "--json"], capsys)
    assert code == 0, err
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "hf").num_hidden_layers == 3
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_drop_apply_explicit_layers_and_bad_input(tmp_path, capsys):
    base = ["drop", "apply", "-m", "tiny-random-llama", "--samples", "2", "--seq-len", "32"]
    code, _, err = run_cli([*base, "--layers", "attention=1;mlp=2", "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    assert Patch.load(tmp_path / "e").spec["attention"] == [1]
    code, _, err = run_cli([*base, "--layers", "attention=1", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli([*base, "--layers", "attention=9", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "out of range" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli([*base, "--blocks", "4", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "at least one must remain" in err
    code, _, err = run_cli([*base, "--attn", "1", "--method", "greedy", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown drop method 'greedy'" in err
    code, _, err = run_cli([*base, "--attn", "1", "--export-hf", str(tmp_path / "h"), "--out", str(tmp_path / "x")],
                           capsys)
    assert code == 2 and "whole-block" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(["drop", "score", "-m", "minilm-l6", "--samples", "1", "--seq-len", "8"], capsys)
    assert code == 2 and "not supported for" in err and "LlamaForCausalLM" in err


def test_skip_train_and_stats(tmp_path, capsys):
    code, out, err = run_cli(["skip", "train", "-m", "tiny-random-llama", "--task", "sharegpt", "--samples", "8",
                              "--batch-size", "4", "--max-length", "64", "--last", "2", "--target", "0.5",
                              "--out", str(tmp_path / "r"), "--quiet", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "router" and info["routed_layers"] == [1, 2] and info["trainable_params"] == 128
    code, out, err = run_cli(["skip", "stats", "-m", "tiny-random-llama", "--patch", str(tmp_path / "r"),
                              "--task", "sms_spam", "--limit", "8", "--json"], capsys)
    assert code == 0, err
    st = json.loads(out)
    assert set(st["executed_fraction"]) == {"1", "2"} and 0.0 <= st["mean_executed"] <= 1.0
    from patchlm.depth.skip import speed_bound, speedup_at
    from patchlm.models import load_base

    sb = st["prefill_speed_bound"]
    want = speed_bound(load_base("tiny-random-llama").model.config, [1, 2], sb["seq_len"])["bound"]
    assert sb["seq_len"] > 1 and sb["bound"] == pytest.approx(want) and sb["bound"] > 1.0
    assert sb["at_mean_executed"] == pytest.approx(speedup_at(want, st["mean_executed"]))
    code, _, err = run_cli(["skip", "train", "-m", "tiny-random-llama", "--layers", "0-2",
                            "--out", str(tmp_path / "bad"), "--samples", "4", "--quiet"], capsys)
    assert code == 2 and "first remaining attention layer" in err and not (tmp_path / "bad").exists()
    assert not (tmp_path / "r.ckpt").exists()  # the checkpoint goes once the patch is written
    code, _, err = run_cli(["skip", "train", "-m", "tiny-random-llama", "--out", str(tmp_path / "new"), "--resume",
                            "--samples", "4", "--quiet"], capsys)
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "new").exists()


def test_skip_train_resume_after_interrupt(tmp_path, capsys, monkeypatch):
    import patchlm.depth.skip as skip

    args = ["skip", "train", "-m", "tiny-random-llama", "--task", "sharegpt", "--samples", "16", "--batch-size", "4",
            "--max-length", "48", "--last", "2", "--save-every", "1", "--out", str(tmp_path / "r"), "--quiet"]
    real = skip.train_routers
    monkeypatch.setattr(skip, "train_routers", lambda *a, **k: real(*a, **{**k, "stop_after": 2}))
    code, _, err = run_cli(args, capsys)
    assert code == 130 and "--resume" in err and not (tmp_path / "r").exists() and (tmp_path / "r.ckpt").exists()
    monkeypatch.setattr(skip, "train_routers", real)
    code, _, err = run_cli(args, capsys)  # neither --resume nor --force: refuses to throw the checkpoint away
    assert code == 2 and "interrupted router training" in err
    code, out, err = run_cli([*args, "--resume", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["metrics"]["steps"] >= 3 and not (tmp_path / "r.ckpt").exists()
    whole = [a if a != str(tmp_path / "r") else str(tmp_path / "whole") for a in args]
    code, _, err = run_cli(whole, capsys)
    assert code == 0, err
    a, b = Patch.load(tmp_path / "r"), Patch.load(tmp_path / "whole")
    assert a.metrics["steps"] == b.metrics["steps"]
    assert all(torch.allclose(a.tensors[k], b.tensors[k], atol=1e-6) for k in b.tensors)


def test_generated_options_default_to_the_config_fields():
    """Every option generated for drop score/apply and skip train defaults to its DropConfig/SkipConfig field."""
    import dataclasses

    from patchlm.cli.depth import apply, score, skip_train
    from patchlm.depth.config import DropConfig, SkipConfig

    seen = set()
    for cmd in (score, apply, skip_train):
        for param, (cls, name, default) in cmd.__patchlm_fields__.items():
            f = next(f for f in dataclasses.fields(cls) if f.name == name)
            assert default == f.default and f.metadata.get("help"), (cmd.__name__, param)
            seen.add((cls.__name__, name))
    assert {n for c, n in seen if c == "DropConfig"} == {f.name for f in dataclasses.fields(DropConfig)}
    assert {n for c, n in seen if c == "SkipConfig"} == {f.name for f in dataclasses.fields(SkipConfig)}
    assert all(f.metadata.get("help") for c in (DropConfig, SkipConfig) for f in dataclasses.fields(c))


def test_errors_name_the_flag_and_patches_stack_in_order(tiny, tmp_path, capsys):
    """Library errors name the config field; the CLI adds the flag. Patches apply weight stage first."""
    base = ["drop", "apply", "-m", "tiny-random-llama", "--samples", "2", "--seq-len", "32"]
    code, _, err = run_cli([*base, "--attn", "9", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "attn 9 is out of range" in err and "--attn" in err
    code, _, err = run_cli(["skip", "train", "-m", "tiny-random-llama", "--last", "9", "--samples", "4", "--quiet",
                            "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "last 9 is out of range" in err and "(option --last)" in err
    code, _, err = run_cli(["skip", "train", "-m", "tiny-random-llama", "--lr", "0", "--out", str(tmp_path / "s")],
                           capsys)
    assert code == 2 and "lr must be positive" in err and "(option --lr)" in err
    lora = _lora_patch(tiny, tmp_path / "lora")
    code, _, err = run_cli([*base, "--layers", "attention=1", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["drop", "score", "-m", "tiny-random-llama", "--samples", "2", "--seq-len", "32",
                              "--patch", str(tmp_path / "d"), "--patch", str(lora), "--json"], capsys)
    assert code == 0, err
    from patchlm.depth.config import DropConfig
    from patchlm.depth.scores import calibration_blocks, similarity_scores

    Patch.load(lora).apply(tiny)
    Patch.load(tmp_path / "d").apply(tiny)
    want = similarity_scores(tiny.model, calibration_blocks(tiny.tokenizer, DropConfig.calib, 2, 32))
    got = json.loads(out)
    assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    assert got["attention"][1] == 1.0  # the dropped attention scores exactly 1
