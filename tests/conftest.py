"""Shared fixtures: the deterministic tiny random Llama and small synthetic tasks (fast, offline)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def tiny():
    """A fresh tiny-random-llama Base (cheap: ~0.1 s after the first build)."""
    from patchlm.models import load_base

    return load_base("tiny-random-llama")


@pytest.fixture()
def toy_task():
    """A 2-label classification task small enough for a few training steps."""
    from patchlm.data.task import Task

    pos = [f"I loved it, great film number {i}" for i in range(24)]
    neg = [f"I hated it, awful film number {i}" for i in range(24)]
    ex = [{"text": t, "label": 0} for t in pos] + [{"text": t, "label": 1} for t in neg]
    ex = [ex[i] for i in (list(range(0, 48, 2)) + list(range(1, 48, 2)))]
    return Task(name="toy", kind="classification", train=ex[:32], validation=ex[32:40], test=ex[40:],
                labels=["pos", "neg"], verbalizers=[" positive", " negative"],
                template="Review: {text}\nSentiment:")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the patchlm CLI in-process; return (exit code, stdout, stderr)."""
    from patchlm.cli.main import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def attach_lora(base, r: int = 4, targets: str = "qv"):
    """Attach a fresh LoRA (alpha 2r, seed 0) to base.model; return (trainable params, {name: LoraLinear})."""
    from patchlm.adapters.inject import wrapped_modules
    from patchlm.adapters.lora import LoraKind, LoraLinear

    kind = LoraKind()
    kind.attach(base.model, {"r": r, "alpha": 2 * r, "targets": targets}, None, seed=0)
    return kind.trainable_parameters(base.model), wrapped_modules(base.model, LoraLinear)


def toy_features(base, task, max_length: int = 64) -> list[dict]:
    """The classification features of task's train split for base's tokenizer."""
    from patchlm.data.features import build_features

    return build_features(task, "train", base.tokenizer, "classification", max_length)


def sample_ids():
    """Two fixed rows of token ids for comparing logits of tiny-random-llama variants."""
    import torch

    return torch.tensor([[5, 17, 300, 4000, 12, 9, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize(params, seed: int = 1, std: float = 0.05) -> None:
    """Add seeded noise to trainable tensors (a fresh adapter is the identity; this makes it do something)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


@contextmanager
def killed_after(step: int):
    """Within the block, the patch trainer's loop raises KeyboardInterrupt just after step `step` (after that
    step's hook, so its checkpoint is written): a run killed there, for resume tests. The block must raise it."""
    import patchlm.train.trainer as tr

    real = tr.train_loop

    def loop(*a, **kw):
        hook = kw["on_step"]

        def on_step(info):
            hook(info)
            if info.step == step:
                raise KeyboardInterrupt

        return real(*a, **{**kw, "on_step": on_step})

    tr.train_loop = loop
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        tr.train_loop = real


# ---------------------------------------------------------------- reference copies of the pre-engine code (af73a9d)
def old_collate(feats, pad_id):
    """patchlm.train.trainer.collate as of af73a9d: the reference the engine's numbers are compared with."""
    import torch

    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), n), -100, dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def old_causal_lm_loss(model, batch):
    """patchlm.train.trainer.causal_lm_loss as of af73a9d (the reference)."""
    import torch.nn.functional as F

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    target = labels[:, 1:]
    keep = target != -100
    n = int(keep.sum())
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), target[keep]), n
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), target[keep]), n
