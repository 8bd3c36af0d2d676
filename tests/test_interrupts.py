"""Ctrl-C and SIGTERM stop training at a step boundary, leave a resumable checkpoint, say how to resume, and exit
130 / 143 (the shell's conventions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PATCHLM = str(Path(sys.executable).with_name("patchlm"))


def _train(out: Path, steps: int, extra=()) -> list[str]:
    return [PATCHLM, "train", "-m", "tiny-random-llama", "-t", "sms_spam", "--rank", "2", "--targets", "attn",
            "--steps", str(steps), "--save-every", "3", "--max-examples", "64", "--eval-limit", "8", "--out", str(out),
            "-q", *extra]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_and_exits_with_the_conventional_code(tmp_path, sig, code):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train(out, 100_000), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    stopped = json.loads(state.read_text())["step"]
    assert 3 <= stopped < 100_000
    assert not (out / "patch").exists()  # the run is not finished: no final patch


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    import torch

    from patchlm.patch import Patch

    steps = 12
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train(tmp_path / "whole", steps), check=True, env=env, capture_output=True)
    # an interrupted run: SIGINT once the first checkpoint exists
    out = tmp_path / "cut"
    proc = subprocess.Popen(_train(out, steps, ["--save-every", "1"]), stderr=subprocess.PIPE, text=True, env=env)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130
    r = subprocess.run(_train(out, steps, ["--resume"]), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = Patch.load(tmp_path / "whole" / "patch"), Patch.load(out / "patch")
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
