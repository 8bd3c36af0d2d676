"""Perplexity of a causal LM over texts, concatenated with EOS and cut into fixed blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchlm.data.features import IGNORE, collate, pack_blocks
from patchlm.errors import DataError
from patchlm.models.parts import autocast, model_device


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], block_size: int = 512, batch_size: int = 4,
               max_tokens: int | None = None, bf16: bool = False) -> dict:
    """exp(mean next-token NLL) over all predicted tokens."""
    device = model_device(model)
    blocks = pack_blocks(tokenizer, texts, block_size, max_tokens)
    if not blocks:
        raise DataError("no text to compute perplexity on: the texts are empty or shorter than two tokens")
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    ctx = autocast(device, bf16)
    try:
        for s in range(0, len(blocks), batch_size):
            chunk = blocks[s: s + batch_size]
            batch = collate([{"input_ids": b} for b in chunk], 0)  # padding is never attended: blocks are causal
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            with ctx:
                logits = model(input_ids=ids).logits
            lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
            nll += lp.item()
            count += int((labels[:, 1:] != IGNORE).sum())
    finally:
        model.train(was)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
