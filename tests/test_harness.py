"""lm-evaluation-harness interop: `patchlm data export-harness` task YAMLs, the registered `patchlm` harness model
(base + patch stack; log-likelihood, rolling log-likelihood, generation), and accuracy through the harness equal
to `patchlm eval`'s on the same examples. The lm-eval parts skip without the `harness` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

LIMIT = 12


@pytest.fixture(scope="module")
def lora_patch(tmp_path_factory):
    """A LoRA patch on tiny-random-llama trained 3 steps with a large rate, so it moves the label scores."""
    from patchlm.data import load_task
    from patchlm.models import load_base
    from patchlm.train.config import TrainConfig
    from patchlm.train.trainer import train_patch

    out = tmp_path_factory.mktemp("harness") / "lora"
    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-2, warmup=0, eval_limit=4, progress=False)
    train_patch(load_base("tiny-random-llama"), load_task("sms_spam", max_examples=80), "lora", {"r": 2}, cfg,
                out=out)
    return out / "patch"


# ------------------------------------------------------------------ export (no lm-eval needed)
def test_export_harness_writes_yaml_and_the_same_examples(tmp_path, capsys):
    from patchlm.data import load_task

    out = tmp_path / "h"
    code, stdout, err = run_cli(["data", "export-harness", "sms_spam", "news_corpus", "--out", str(out), "--json"],
                                capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert [t["harness_task"] for t in res["tasks"]] == ["patchlm_sms_spam", "patchlm_news_corpus"]
    cfg = json.loads((out / "patchlm_sms_spam" / "patchlm_sms_spam.yaml").read_text())  # JSON is YAML
    task = load_task("sms_spam")
    assert cfg["output_type"] == "multiple_choice" and cfg["doc_to_choice"] == task.verbalizers
    assert cfg["target_delimiter"] == "" and cfg["doc_to_text"] == "prompt" and cfg["test_split"] == "test"
    for split in ("train", "validation", "test"):
        path = cfg["dataset_kwargs"]["data_files"][split]
        assert os.path.isabs(path)
        rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [task.prompt(e) for e in task.split(split)]
        assert [r["label"] for r in rows] == [e["label"] for e in task.split(split)]
    text = json.loads((out / "patchlm_news_corpus" / "patchlm_news_corpus.yaml").read_text())
    assert text["output_type"] == "loglikelihood_rolling" and text["doc_to_target"] == "text"
    code, _, err = run_cli(["data", "--json"], capsys)  # the listing still works as before
    assert code == 0, err


def test_export_harness_bad_input(tmp_path, capsys):
    out = tmp_path / "h"
    for argv, msg in ((["no_such_task"], "no_such_task"), (["sharegpt"], "only classification and text"),
                      (["sms_spam", "--max-examples", "-3"], "")):
        code, _, err = run_cli(["data", "export-harness", *argv, "--out", str(out)], capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists()
    code, _, err = run_cli(["data", "export-harness", "--out", str(out)], capsys)
    assert code == 2 and not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = run_cli(["data", "export-harness", "sms_spam", "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "keep").read_text() == "x"


# ------------------------------------------------------------------ the harness model
def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[harness]')")


class _Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_equals_patchlm_label_scores(lora_patch):
    _lm_eval()
    import torch

    from patchlm.data import load_task
    from patchlm.evaluate import label_scores
    from patchlm.evaluate.harness import PatchlmLM

    lm = PatchlmLM(base="tiny-random-llama", patches=str(lora_patch), batch_size=5)
    task = load_task("sms_spam")
    ex = task.split("test")[:LIMIT]
    want = label_scores(lm.model, lm.tokenizer, task, ex)
    reqs = [_Req(task.prompt(e), v) for e in ex for v in task.verbalizers]
    got = torch.tensor([ll for ll, _ in lm.loglikelihood(reqs)]).view(len(ex), -1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # a multi-token continuation: the sum over its tokens, and greedy flags are booleans
    (ll, greedy), = lm.loglikelihood([_Req("Hello there", " general kenobi")])
    assert ll < 0 and isinstance(greedy, bool)


def test_rolling_loglikelihood_and_generation():
    _lm_eval()
    import torch

    from patchlm.evaluate.harness import PatchlmLM

    lm = PatchlmLM(base="tiny-random-llama", max_length=8)
    text = "the quick brown fox jumps over the lazy dog and runs away into the woods"
    ids = [lm.eot, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():  # one long window (no cut): the reference the 8-token windows must approach
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    whole = float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    (windowed,) = lm.loglikelihood_rolling([_Req(text)])
    lm.max_length = 4096
    (one,) = lm.loglikelihood_rolling([_Req(text)])
    assert abs(one - whole) < 1e-3 and windowed < 0
    outs = lm.generate_until([_Req("Once upon a time", {"until": ["\n"], "max_gen_toks": 5})])
    assert len(outs) == 1 and isinstance(outs[0], str) and "\n" not in outs[0]


def test_bad_model_args():
    _lm_eval()
    from patchlm.errors import ConfigError, PatchlmError
    from patchlm.evaluate.harness import PatchlmLM

    with pytest.raises(ConfigError, match="base=NAME"):
        PatchlmLM()
    with pytest.raises(PatchlmError):
        PatchlmLM(base="tiny-random-llama", patches="/no/such/patch")


@pytest.mark.slow
def test_harness_accuracy_equals_patchlm_eval(lora_patch, tmp_path, capsys):
    """simple_evaluate with the model given by name, as `lm_eval --model patchlm --model_args ...` does."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    code, _, err = run_cli(["data", "export-harness", "sms_spam", "--out", str(tmp_path / "h")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", str(lora_patch), "--limit",
                              str(LIMIT), "--json"], capsys)
    assert code == 0, err
    ours = json.loads(out)
    res = simple_evaluate(model="patchlm", model_args=f"base=tiny-random-llama,patches={lora_patch}",
                          tasks=["patchlm_sms_spam"], limit=LIMIT, task_manager=TaskManager(
                              include_path=str(tmp_path / "h")), log_samples=True)
    harness = res["results"]["patchlm_sms_spam"]
    assert harness["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    # each sample's requests: (context, continuation) pairs (older releases: {"gen_args_0": {"arg_0": ...}})
    ctxs = [a["gen_args_0"]["arg_0"] if isinstance(a, dict) else a[0][0]
            for a in (s["arguments"] for s in res["samples"]["patchlm_sms_spam"])]
    from patchlm.data import load_task

    task = load_task("sms_spam")
    assert sorted(set(ctxs)) == sorted({task.prompt(e) for e in task.split("test")[:LIMIT]})


def test_lm_eval_finds_the_model_through_the_hook(tmp_path):
    """The .pth hook makes a fresh interpreter's lm_eval resolve --model patchlm (lazily: no patchlm import)."""
    _lm_eval()
    from patchlm.evaluate.harness import install_hook

    site = tmp_path / "site"
    site.mkdir()
    install_hook(site)
    import sysconfig

    # -S: no .pth of the venv runs (it may hold the installed hook); its packages and src/ go on the path by hand
    paths = [sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parents[1] / "src")]
    code = ("import site, sys; sys.path[:0] = sys.argv[2:]; site.addsitedir(sys.argv[1]); "
            "from lm_eval.api.registry import get_model; "
            "assert 'patchlm.evaluate' not in sys.modules; "
            "print(get_model('patchlm').__name__, get_model('hf').__name__)")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(site), *paths], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PatchlmLM", "HFLM"]
