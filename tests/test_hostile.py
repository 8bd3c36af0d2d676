"""Hostile input: every bad input is refused before anything is written or destroyed (exit 2, one error line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

TRAIN = ["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--rank", "2", "--targets", "attn", "--steps", "2",
         "--max-examples", "32", "--eval-limit", "4", "-q"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time (to prove a failed command changed nothing)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished two-step LoRA run on tiny-random-llama (its dir: checkpoints/, metrics.jsonl, patch/)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    code, _, err = run_cli([*TRAIN, "--out", str(out)], _CaptureNothing())
    assert code == 0, err
    return out


class _CaptureNothing:
    """A stand-in for pytest's capsys in module fixtures (run_cli only needs readouterr)."""

    def readouterr(self):
        class _R:
            out = ""
            err = ""

        return _R()


def test_force_with_a_bad_option_keeps_the_old_run(trained_run, capsys):
    before = snapshot(trained_run)
    code, _, err = run_cli([*TRAIN, "--out", str(trained_run), "--force", "--targets", "foo_proj"], capsys)
    assert code == 2, err
    assert "foo_proj" in err and "Traceback" not in err
    assert snapshot(trained_run) == before
    assert not [p for p in trained_run.parent.iterdir() if p.name.startswith(".")]  # no set-aside copy left


def test_force_replaces_the_run_once_the_new_one_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TRAIN, "--out", str(out)], capsys)[0] == 0
    (out / "marker").write_text("old run")
    code, _, err = run_cli([*TRAIN, "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "marker").exists() and (out / "patch" / "patch.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_set_aside_restores_unless_the_new_target_is_kept(tmp_path):
    from patchlm.paths import set_aside

    t = tmp_path / "t"
    t.mkdir()
    (t / "a").write_text("old")
    with pytest.raises(RuntimeError), set_aside(t, keep_new=lambda p: False):
        t.mkdir()
        (t / "b").write_text("partial")
        raise RuntimeError
    assert sorted(p.name for p in t.iterdir()) == ["a"]
    with pytest.raises(RuntimeError), set_aside(t, keep_new=lambda p: (p / "ckpt").exists()):
        t.mkdir()
        (t / "ckpt").write_text("resumable")
        raise RuntimeError
    assert sorted(p.name for p in t.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# ---------------------------------------------------------------- non-finite numbers
def nan_patch(src: Path, dst: Path, value: float = float("nan")) -> str:
    """A copy of patch `src` at `dst` whose first tensor holds `value` (checksum updated, so only NaN is wrong)."""
    import hashlib
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "tensors.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(dst / "tensors.safetensors"), metadata={"format": "patchlm"})
    meta = json.loads((dst / "patch.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256((dst / "tensors.safetensors").read_bytes()).hexdigest()
    (dst / "patch.json").write_text(json.dumps(meta))
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_patch_is_refused_by_every_consumer(trained_run, tmp_path, capsys, value):
    bad = tmp_path / "bad"
    name = nan_patch(trained_run / "patch", bad, value)
    before = snapshot(tmp_path)
    for argv in (["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", str(bad), "--limit", "4"],
                 ["export", str(bad), "--out", str(tmp_path / "peft")],
                 ["merge", "-p", str(bad), "-p", str(trained_run / "patch"), "--method", "linear",
                  "--out", str(tmp_path / "m")],
                 ["info", str(bad)]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2, (argv, err)
        assert name in err and "tensors.safetensors" in err and "Traceback" not in err, (argv, err)
        assert err.count("error:") == 1, err
    assert snapshot(tmp_path) == before


def test_a_non_finite_patch_is_never_saved_or_applied(trained_run, tmp_path, tiny):
    import torch

    from patchlm.errors import PatchFormatError
    from patchlm.patch import Patch

    p = Patch.load(trained_run / "patch")
    p.tensors = {k: torch.full_like(v, float("nan")) for k, v in p.tensors.items()}
    with pytest.raises(PatchFormatError, match="refusing to save"):
        p.save(tmp_path / "p")
    assert not (tmp_path / "p").exists() and not list(tmp_path.iterdir())
    with pytest.raises(PatchFormatError, match="NaN"):
        p.apply(tiny)


def test_json_is_strict_both_ways(trained_run, tmp_path, capsys):
    import json
    import shutil

    from patchlm.errors import PatchlmError
    from patchlm.paths import strict_json

    with pytest.raises(PatchlmError, match=r"metrics\.val_loss"):
        strict_json({"metrics": {"val_loss": float("nan")}}, "the report")
    bad = tmp_path / "nanjson"
    shutil.copytree(trained_run / "patch", bad)
    meta = json.loads((bad / "patch.json").read_text())
    meta["metrics"]["val_accuracy"] = float("nan")
    (bad / "patch.json").write_text(json.dumps(meta))  # Python writes a bare NaN: not JSON
    code, _, err = run_cli(["info", str(bad)], capsys)
    assert code == 2 and "NaN" in err and "patch.json" in err and "Traceback" not in err, err
    # what patchlm itself writes parses under a strict reader
    for f in [trained_run / "patch" / "patch.json", trained_run / "checkpoints" / "last" / "state.json"]:
        json.loads(f.read_text(), parse_constant=lambda c, f=f: pytest.fail(f"{f} holds {c}"))
    for line in (trained_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))


# ---------------------------------------------------------------- data sanity
def _csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return path


@pytest.mark.parametrize("rows,match", [
    ([(f"row {i}", 1) for i in range(20)], "single value"),
    ([(f"row {i}", i * 0.37) for i in range(20)], "looks continuous"),
    ([(f"row {i}", i) for i in range(20)], "distinct values"),
    ([(f"row {i}", i % 60) for i in range(600)], "max_labels"),
])
def test_label_columns_that_are_not_classes_are_refused(tmp_path, rows, match):
    from patchlm.data import load_task
    from patchlm.errors import PatchlmError

    with pytest.raises(PatchlmError, match=match):
        load_task(str(_csv(tmp_path / "d.csv", rows)))


def test_max_labels_lets_many_real_classes_through(tmp_path):
    from patchlm.data import DataConfig, load_task

    t = load_task(str(_csv(tmp_path / "d.csv", [(f"row {i}", i % 60) for i in range(600)])),
                  checks=DataConfig(max_labels=60))
    assert len(t.labels) == 60


def test_duplicates_and_empty_texts_warn_and_the_warning_can_be_silenced(tmp_path):
    import warnings

    from patchlm.data import DataConfig, DataWarning, load_task

    rows = [(f"text {i % 10}", i % 2) for i in range(20)] + [("", 0), ("   ", 1)]
    f = _csv(tmp_path / "d.csv", rows)
    with pytest.warns(DataWarning) as got:
        t = load_task(str(f))
    text = " ".join(str(w.message) for w in got)
    assert "duplicate" in text and "empty" in text
    every = [normalize for split in (t.train, t.validation, t.test) for normalize in (e["text"] for e in split)]
    assert len(every) == len(set(every)) == 10  # no text in two splits
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_task(str(f), checks=DataConfig(data_warnings=False))


def test_train_refuses_data_smaller_than_one_batch_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import patchlm.models

    monkeypatch.setattr(patchlm.models, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    f = _csv(tmp_path / "d.csv", [(f"good {i}", 0) for i in range(3)] + [(f"bad {i}", 1) for i in range(3)])
    before = snapshot(tmp_path)
    code, _, err = run_cli(["train", "-m", "tiny-random-llama", "-t", str(f), "--batch-size", "8",
                            "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "fewer than one batch" in err and err.count("error:") == 1, err
    assert snapshot(tmp_path) == before


def test_the_cli_prints_a_data_warning_as_one_line_and_a_config_field_silences_it(tmp_path):
    import subprocess
    import sys

    f = _csv(tmp_path / "d.csv", [(f"text {i % 10}", i % 2) for i in range(20)])
    argv = [str(Path(sys.executable).with_name("patchlm")), "train", "-m", "nope-model", "-t", str(f),
            "--out", str(tmp_path / "r"), "--batch-size", "2"]
    loud = subprocess.run(argv, capture_output=True, text=True)
    assert loud.returncode == 2 and "Traceback" not in loud.stderr, loud.stderr
    assert [ln for ln in loud.stderr.splitlines() if ln.startswith("warning:") and "duplicate" in ln], loud.stderr
    quiet = subprocess.run([*argv, "--no-data-warnings"], capture_output=True, text=True)
    assert quiet.returncode == 2 and "warning:" not in quiet.stderr, quiet.stderr
