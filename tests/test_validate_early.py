"""Late validation moved early: these bad inputs are refused (exit 2, one error line naming the option or the
patches) before any model loads or any process starts, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model (or starting a Flower deployment) fails the test: validation must come first."""
    import patchlm.federated.flower.run as fed_run
    import patchlm.models as models

    def boom(*a, **k):
        raise AssertionError("reached the model load / deployment before validating")

    monkeypatch.setattr(models, "load_base", boom)
    monkeypatch.setattr(fed_run, "federate", boom)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def drops(tmp_path_factory):
    """Three drop patches of tiny-random-llama: the first half of its attention layers, the second half, layer 0."""
    from patchlm.depth.drop import drop_patch
    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    n = base.num_layers
    assert n >= 2
    d = tmp_path_factory.mktemp("drops")
    scores = {"attention": [0.0] * n, "mlp": [0.0] * n, "block": [0.0] * n}
    out = {}
    for name, idx in (("front", list(range(n // 2))), ("back", list(range(n // 2, n))), ("zero", [0])):
        plan = {"attention": idx, "mlp": [], "block": []}
        out[name] = drop_patch(base, plan, scores, "explicit", {"task": "none"}).save(d / name)
    return out


@pytest.mark.parametrize(("argv", "expect"), [
    (["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--timeout", "0"], "--timeout"),
    (["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--timeout", "-5"], "--timeout"),
    (["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--round-timeout", "0"], "--round-timeout"),
    (["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--straggler-timeout", "-1"],
     "--straggler-timeout"),
    (["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--dp", "--dp-noise", "-1"], "--dp-noise"),
    (["demo", "--rank", "0"], "--rank"),
])
def test_refused_before_any_work(argv, expect, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 2, err
    assert expect in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert files(tmp_path) == []


def test_merge_and_glue_numbers_refused_before_loading(drops, tmp_path, capsys, no_model):
    p = str(drops["zero"])
    for argv, expect in (
        (["merge", "-p", p, "-p", p, "--method", "fisher", "--fisher-examples", "0", "--out", str(tmp_path / "m")],
         "--fisher-examples"),
        (["glue", "-p", p, "-p", p, "-t", "sms_spam", "--trials", "0"], "--trials"),
        (["glue", "-p", p, "-p", p, "-t", "sms_spam", "--threshold", "2"], "--threshold"),
    ):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and expect in err and err.count("error:") == 1, (argv, err)
    assert files(tmp_path) == []


def test_stacked_drops_that_remove_every_attention_layer_are_refused(drops, tmp_path, capsys, no_model):
    front, back = str(drops["front"]), str(drops["back"])
    for argv in (["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", front, "-p", back, "--limit", "2"],
                 ["drop", "score", "-m", "tiny-random-llama", "-p", front, "-p", back],
                 ["drop", "apply", "-m", "tiny-random-llama", "-p", front, "-p", back, "--attn", "1",
                  "--out", str(tmp_path / "d")]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert front in err and back in err and "attention" in err and err.count("error:") == 1, err
    assert files(tmp_path) == []


def test_stacked_drops_that_leave_attention_pass_the_check(drops):
    from patchlm.cli.common import load_patches

    assert [p.kind for p in load_patches([drops["front"], drops["zero"]])] == ["drop", "drop"]
