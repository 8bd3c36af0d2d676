"""Data-parallel training: `torchrun --nproc-per-node 2 -m patchlm train ...` on tiny-random-llama (gloo, CPU)
gives the patch one process gives with the same global batch, writes from rank 0 only, and resumes; the
all-reduce wrapper equals the plain rule and refuses rules that read the whole batch themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

# batch 3 over 2 ranks: unequal shares (2 rows and 1), so the label-count weighting of the reduction is exercised.
# SGD: the update is linear in the gradient, so the patches differ by float rounding only (AdamW's first steps are
# nearly lr * sign(g) and turn rounding in near-zero gradient entries into ~1e-5 differences at lr 2e-2)
ARGS = ["--model", "tiny-random-llama", "--task", "sms_spam", "--max-examples", "40", "--method", "lora",
        "--rank", "2", "--batch-size", "3", "--grad-accum", "2", "--optimizer", "sgd", "--lr", "0.5", "--warmup", "0",
        "--schedule", "constant", "--eval-limit", "4", "--save-every", "1", "--log-every", "1", "--quiet"]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The contract's command, with one thread per rank (two ranks share this machine's cores)."""
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "patchlm", "train", *ARGS, "--out", str(out),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=110)


def _tensors(patch_dir: Path) -> dict:
    from patchlm.patch import Patch

    return Patch.load(patch_dir).tensors


def _assert_same_patch(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        diff = float((ta[k].float() - tb[k].float()).abs().max())
        assert diff < 1e-5, (k, diff)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.timeout(120)
def test_torchrun_two_ranks_equal_one_process_and_resume(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(["train", *ARGS, "--steps", "2", "--out", str(one)], capsys)
    assert code == 0, err
    shutil.copytree(one, tmp_path / "one_at_2")
    code, _, err = run_cli(["train", *ARGS, "--steps", "4", "--out", str(one), "--resume"], capsys)
    assert code == 0, err

    r = _torchrun(two, "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_patch(tmp_path / "one_at_2" / "patch", two / "patch")
    # rank 0 alone wrote: the same files, one metrics record per event (two writers would append each twice),
    # one line of output
    assert _files(two) == _files(tmp_path / "one_at_2")
    assert [x["step"] for x in _records(two)] == [x["step"] for x in _records(tmp_path / "one_at_2")]
    assert (r.stdout + r.stderr).count("wrote ") == 1, (r.stdout, r.stderr)

    r = _torchrun(two, "--steps", "4", "--resume")  # every rank resumes from rank 0's checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_patch(one / "patch", two / "patch")
    assert _files(two) == _files(one)
    mine, ref = _records(two), _records(one)
    assert [x["step"] for x in mine] == [x["step"] for x in ref]
    for a, b in zip(mine, ref):  # the logged loss is the global batch's, not rank 0's share
        for key in ("loss", "val_accuracy", "forward_passes"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)


# ------------------------------------------------------------------ the all-reduce wrapper, in-process
@pytest.fixture()
def one_rank(tmp_path):
    """A one-process gloo group and a DataParallel on it, so the wrapper's reduction runs without a launcher."""
    import torch.distributed as dist

    from patchlm.train.distributed import DataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dp = DataParallel()
        dp.enabled = True  # the reduction path, over a world of one
        yield dp
    finally:
        dist.destroy_process_group()


def _steps(tiny, toy_task, optimizer: str, dp=None, steps: int = 2) -> list:
    """Train a LoRA `steps` steps with `optimizer` (through the wrapper when dp is given); the LoRA tensors."""
    import torch
    from conftest import attach_lora, toy_features

    from patchlm.data.features import collate, pad_id
    from patchlm.train.config import TrainConfig
    from patchlm.train.engine import train_loop
    from patchlm.train.optim import make_optimizer

    torch.manual_seed(0)
    params, _ = attach_lora(tiny, r=2)
    feats = toy_features(tiny, toy_task)
    cfg = TrainConfig(lr=1e-2, optimizer=optimizer, weight_decay=0.1)
    rule = make_optimizer(optimizer, params, cfg, model=tiny.model)
    if dp is not None:
        rule = dp.rule(rule)

    def batches(step):
        micro = [collate(feats[(2 * step + j) * 3: (2 * step + j + 1) * 3], pad_id(tiny.tokenizer)) for j in (0, 1)]
        return dp.shard(micro) if dp is not None else micro

    train_loop(tiny.model, rule, batches, steps, bf16=False)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("optimizer", ["adamw", "zo-sgd"])
def test_all_reduce_rule_equals_the_plain_rule(tiny, toy_task, one_rank, optimizer):
    from patchlm.models import load_base

    want = _steps(tiny, toy_task, optimizer)
    got = _steps(load_base("tiny-random-llama"), toy_task, optimizer, dp=one_rank)
    for a, b in zip(want, got):
        assert float((a - b).abs().max()) < 1e-6
    assert one_rank.step_labels > 0 and one_rank.step_tokens >= one_rank.step_labels


def test_rules_that_read_the_batch_refuse_data_parallel(tiny, toy_task, one_rank):
    from patchlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"forward-grad.*one process") as e:
        _steps(tiny, toy_task, "forward-grad", dp=one_rank, steps=1)
    assert e.value.field == "optimizer"
