"""The CLI contract of the foundation issue, and every bad input it names."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

TRAIN = ["train", "--model", "tiny-random-llama", "--task", "sms_spam", "--method", "lora", "--rank", "4",
         "--steps", "6", "--batch-size", "2", "--eval-limit", "8", "--max-examples", "200", "-q"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from patchlm.cli.main import main

    out = tmp_path_factory.mktemp("cli") / "run"
    try:
        main([*TRAIN, "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def test_models_and_data_json(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    assert {"smollm2-135m", "tiny-random-llama", "minilm-l6", "gemma3-270m"} <= {m["name"] for m in json.loads(out)}
    code, out, _ = run_cli(["data", "--json"], capsys)
    names = {d["name"] for d in json.loads(out)}
    assert {"rotten_tomatoes", "movie_sentiment", "tweet_sentiment", "sms_spam", "trec", "bbc_news",
            "health_tweets", "news_corpus", "sharegpt", "gsm8k"} <= names


def test_train_writes_a_patch(trained):
    assert (trained / "patch" / "patch.json").exists()
    assert (trained / "patch" / "tensors.safetensors").exists()
    assert (trained / "metrics.jsonl").exists()


def test_eval_info_export(trained, tmp_path, capsys):
    code, out, _ = run_cli(["eval", "--model", "tiny-random-llama", "--task", "sms_spam", "--patch",
                            str(trained / "patch"), "--limit", "16", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert 0 <= res["accuracy"] <= 1 and res["n"] == 16
    code, out, _ = run_cli(["info", str(trained / "patch"), "--json"], capsys)
    d = json.loads(out)
    assert d["kind"] == "lora" and d["base"]["name"] == "tiny-random-llama"
    assert d["trainable_params"] == 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                                               (64, 128), (64, 128), (128, 64)]) * 4
    code, _, _ = run_cli(["export", str(trained / "patch"), "--format", "peft", "--out", str(tmp_path / "peft")],
                         capsys)
    assert code == 0
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    code, _, _ = run_cli(["export", str(trained / "patch"), "--format", "merged", "--out", str(tmp_path / "hf")],
                         capsys)
    assert code == 0
    import torch
    from conftest import sample_ids
    from transformers import AutoModelForCausalLM

    from patchlm.models import load_base
    from patchlm.patch import Patch

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    base = load_base("tiny-random-llama")
    Patch.load(trained / "patch").apply(base)
    base.model.eval()
    with torch.no_grad():
        want = base.model(sample_ids()).logits
        got = merged(sample_ids()).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain checkpoint
    assert (got - want).abs().max() < 1e-5  # the merged export computes base + patch


def test_library_and_cli_build_the_same_lora_spec(trained, tiny):
    """alpha has one default (2 x r): `train_patch(..., {"r": 4})` and `patchlm train --rank 4` agree."""
    from patchlm.adapters import LoraConfig
    from patchlm.data import load_task
    from patchlm.patch import Patch
    from patchlm.train import TrainConfig, train_patch

    cli = Patch.load(trained / "patch")
    task = load_task("sms_spam", max_examples=40)
    lib = train_patch(tiny, task, "lora", {"r": 4}, TrainConfig(steps=1, batch_size=2, progress=False, eval_limit=4))
    assert lib.spec == cli.spec
    assert cli.spec["alpha"] == LoraConfig(r=4).lora_alpha == 8.0


def test_recipe_spec_keys_and_method_flags_are_checked(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("model: tiny-random-llama\ntask: sms_spam\nmethod: lora\nspec: {r: 2, rnak: 3}\n")
    _bad(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "b")], "rnak")
    _bad(capsys, [*TRAIN, "--mos-r", "4", "--out", str(tmp_path / "b")], "--mos-r")
    _bad(capsys, [*TRAIN[:6], "mos", *TRAIN[9:], "--rank", "4", "--out", str(tmp_path / "b")], "--mos-r")
    _bad(capsys, [*TRAIN, "--optimizer", "adamw2", "--out", str(tmp_path / "b")], "adamw2")
    assert not (tmp_path / "b").exists()


def _bad(capsys, argv, must_mention, tmp_path=None):
    code, _out, err = run_cli(argv, capsys)
    assert code == 2, (code, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert must_mention in lines[0], lines[0]


def test_bad_inputs(trained, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(capsys, [*TRAIN[:2], "nope-model", *TRAIN[3:], "--out", str(out)], "nope-model")
    _bad(capsys, ["train", "--model", "tiny-random-llama", "--task", "imbd", "--out", str(out)], "imbd")
    _bad(capsys, [*TRAIN, "--targets", "qproj", "--out", str(out)], "qproj")
    _bad(capsys, [*TRAIN[:7], "--rank=-3", *TRAIN[9:], "--out", str(out)], "rank")
    _bad(capsys, [*TRAIN[:9], "--steps=-5", *TRAIN[11:], "--out", str(out)], "steps")
    _bad(capsys, [*TRAIN, "--no-such-flag", "--out", str(out)], "no-such-flag")
    assert not out.exists()  # nothing half-written by any of the above
    _bad(capsys, [*TRAIN, "--out", str(trained)], "already exists")
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\nhello,a\nworld,b\n")
    _bad(capsys, ["train", "--model", "tiny-random-llama", "--task", str(csv), "--out", str(out)], "text")
    assert not out.exists()


def test_patch_for_another_base_and_truncated_file(trained, tmp_path, capsys):
    import shutil

    from patchlm.models import load_base

    b = load_base("tiny-random-llama")
    with __import__("torch").no_grad():
        b.model.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    b.model.save_pretrained(tmp_path / "other")
    b.tokenizer.save_pretrained(tmp_path / "other")
    _bad(capsys, ["eval", "--model", str(tmp_path / "other"), "--task", "sms_spam", "--patch", str(trained / "patch"),
                  "--limit", "4"], "fingerprint")
    broken = tmp_path / "broken"
    shutil.copytree(trained / "patch", broken)
    f = broken / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    _bad(capsys, ["info", str(broken)], "truncated")


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "patchlm"
    r = subprocess.run([str(exe), "eval", "--model", "tiny-random-llama", "--task", "nope"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = subprocess.run([str(exe), "--debug", "eval", "--model", "tiny-random-llama", "--task", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" in r.stderr


def test_yaml_recipe_and_flag_override(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lora-tiny-smoke.yml"
    code, out, err = run_cli(["train", "--config", str(recipe), "--steps", "3", "--max-examples", "100", "-q",
                              "--out", str(tmp_path / "r"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["spec"]["r"] == 2 and info["metrics"]["steps"] == 3  # flag beats the recipe's 4 steps
    assert all(t.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"} for t in info["spec"]["targets"])
    bad = tmp_path / "bad.yml"
    bad.write_text("model: tiny-random-llama\ntask: sms_spam\ntrian: {steps: 3}\n")
    _bad(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "b")], "trian")


def test_flags_override_recipe_spec(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lora-tiny-smoke.yml"
    code, out, err = run_cli(["train", "--config", str(recipe), "--rank", "3", "--targets", "mlp", "--max-examples",
                              "100", "-q", "--out", str(tmp_path / "r"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["spec"]["r"] == 3 and info["spec"]["alpha"] == 4  # alpha from the recipe, rank from the flag
    assert all(t.split(".")[-1] in {"gate_proj", "up_proj", "down_proj"} for t in info["spec"]["targets"])
