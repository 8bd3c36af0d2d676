"""Parity with mergekit on the same mergekit-format configs (tiny checkpoints).

Runs when mergekit is importable or its separate environment exists (bench/.cache/mergekit-venv, see
docs/benchmarks/merging.md for how to create it); skipped otherwise. mergekit is never installed into
patchlm's own environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / "bench" / ".cache" / "mergekit-venv" / "bin" / "python"


def _mergekit_python() -> str | None:
    if importlib.util.find_spec("mergekit") is not None:
        return sys.executable
    if VENV_PY.exists():
        r = subprocess.run([str(VENV_PY), "-c", "import mergekit"], capture_output=True)
        if r.returncode == 0:
            return str(VENV_PY)
    return None


MK_PY = _mergekit_python()
pytestmark = pytest.mark.skipif(MK_PY is None, reason="mergekit not installed (bench/.cache/mergekit-venv)")

DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
jobs = json.loads(sys.argv[1])
for cfg_path, out in jobs:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
    run_merge(cfg, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
"""


def _methods(base, a, b, c):
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                        {"model": b, "parameters": {"weight": 0.7}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.8},
                            "models": [{"model": a, "parameters": {"weight": [0.2, 1.0]}},
                                       {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.5},
                                                                              {"value": 1.0}]}}]},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": b, "parameters": {"weight": 0.4, "density": 0.7}},
                            {"model": c, "parameters": {"weight": 0.3, "density": 0.3}}]},
        "ties_unnormalized": {"merge_method": "ties", "base_model": base, "parameters": {"normalize": False},
                              "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.4}},
                                         {"model": b, "parameters": {"weight": 1.0, "density": 0.4}}]},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base,
                        "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}},
                                   {"model": b, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.1}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.8}},
                                        {"model": b, "parameters": {"weight": 1.0, "density": 0.8}}]},
        "dare_linear_dense": {"merge_method": "dare_linear", "base_model": base,  # density 1: no randomness
                              "models": [{"model": a, "parameters": {"weight": 0.5, "density": 1.0}},
                                         {"model": b, "parameters": {"weight": 0.5, "density": 1.0}}]},
        "slerp": {"merge_method": "slerp", "base_model": base,
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                       {"value": 0.5}]},
                  "models": [{"model": base}, {"model": a}]},
    }


def test_outputs_match_mergekit(tmp_path):
    import yaml

    from patchlm.merge.plan import load_plan
    from patchlm.merge.stream import merge_checkpoints
    from patchlm.models import load_base

    base = Path(load_base("tiny-random-llama").path)
    zoo = {}
    for i, name in enumerate("abc"):
        d = tmp_path / name
        shutil.copytree(base, d)
        sd = load_file(str(d / "model.safetensors"))
        g = torch.Generator().manual_seed(i + 1)
        save_file({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in sd.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        zoo[name] = str(d)
    cfgs = _methods(str(base), zoo["a"], zoo["b"], zoo["c"])
    jobs = []
    for name, cfg in cfgs.items():
        cfg["dtype"] = "float32"
        f = tmp_path / f"{name}.yml"
        f.write_text(yaml.safe_dump(cfg))
        jobs.append((str(f), str(tmp_path / f"mk-{name}")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([MK_PY, "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for (cfg_path, mk_out), name in zip(jobs, cfgs):
        out = tmp_path / f"pl-{name}"
        merge_checkpoints(load_plan(cfg_path), out)
        want, got = load_file(str(Path(mk_out) / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert set(want) == set(got), name
        for k in want:
            diff = float((got[k] - want[k]).abs().max())
            assert torch.allclose(got[k], want[k], atol=2e-6, rtol=1e-5), (name, k, diff)
