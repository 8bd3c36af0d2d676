"""A training process killed with SIGKILL resumes from its last checkpoint and finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigkill_then_resume(tmp_path):
    exe = str(Path(sys.executable).parent / "patchlm")
    out = tmp_path / "run"
    args = [exe, "train", "--model", "tiny-random-llama", "--task", "sms_spam", "--rank", "2", "--steps", "400",
            "--batch-size", "2", "--save-every", "10", "--eval-limit", "8", "--max-examples", "300", "-q",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["step"] >= 20):
            time.sleep(0.05)
        assert state.exists(), "no checkpoint was written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = json.loads(state.read_text())["step"]
    assert 20 <= killed_at < 400 and not (out / "patch").exists()
    r = subprocess.run([*args, "--resume", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["steps"] == 400
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 400 and min(s for s in steps if s > killed_at) <= killed_at + 10
