"""Full fine-tuning as a patch: trains the base's linear weights, saves W - W0 as a merged patch."""

from __future__ import annotations

import torch
from conftest import killed_after, run_cli

from patchlm.patch import Patch, get_kind
from patchlm.train import TrainConfig, Trainer


def _cfg(**kw):
    return TrainConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "eval_limit": 4,
                          "save_every": 2, **kw})


def _logits(model):
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_training_saves_a_merged_delta_that_reproduces_the_model(tiny, toy_task, tmp_path):
    from patchlm.models import load_base

    before = _logits(tiny.model)
    w0 = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    patch = Trainer(tiny, "full", {}, toy_task, _cfg(), out_dir=tmp_path / "r").run()
    assert patch.kind == "merged" and patch.spec["method"] == "full"
    assert all(k.endswith(".delta") for k in patch.tensors) and len(patch.tensors) == 4 * 7
    trained = _logits(tiny.model)
    assert not torch.allclose(trained, before)
    # embeddings and norms are frozen
    for n, p in tiny.model.named_parameters():
        if "proj" not in n:
            assert torch.equal(p.detach(), w0[n]), n
    fresh = load_base("tiny-random-llama")
    Patch.load(tmp_path / "r" / "patch").apply(fresh)
    assert torch.allclose(_logits(fresh.model), trained, atol=1e-5)
    get_kind("full").detach(tiny.model)  # back to W0, bit for bit
    for n, p in tiny.model.named_parameters():
        assert torch.equal(p.detach(), w0[n]), n
    assert torch.equal(_logits(tiny.model), before)


def test_full_zero_order_training_resumes_exactly(toy_task, tmp_path):
    from patchlm.models import load_base

    cfg = _cfg(optimizer="zo-sgd", lr=1e-4, steps=4)
    whole = Trainer(load_base("tiny-random-llama"), "full", {}, toy_task, cfg).run().tensors
    with killed_after(2):
        Trainer(load_base("tiny-random-llama"), "full", {}, toy_task, cfg, out_dir=tmp_path / "z").run()
    resumed = Trainer(load_base("tiny-random-llama"), "full", {}, toy_task, cfg, out_dir=tmp_path / "z",
                      resume=True).run().tensors
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_cli_trains_full_with_zero_order_and_evaluates_it(tmp_path, capsys):
    code, _, err = run_cli(["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--method", "full", "--optimizer",
                            "zo-sgd", "--lr", "1e-5", "--steps", "2", "--max-examples", "40", "--eval-limit", "8",
                            "--targets", "attn", "--out", str(tmp_path / "f"), "-q"], capsys)
    assert code == 0, err
    p = Patch.load(tmp_path / "f" / "patch")
    assert p.kind == "merged" and len(p.tensors) == 4 * 4
    code, out, err = run_cli(["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", str(tmp_path / "f" / "patch"),
                              "--limit", "8", "--json"], capsys)
    assert code == 0, err and '"accuracy"' in out
