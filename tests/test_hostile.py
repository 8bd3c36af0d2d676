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
