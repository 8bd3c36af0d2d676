"""Perplexity of a causal LM over texts, concatenated with EOS and cut into fixed blocks."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from patchlm.data.features import pack_blocks


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], block_size: int = 512, batch_size: int = 4,
               max_tokens: int | None = None, bf16: bool = False) -> dict:
    """exp(mean next-token NLL) over all predicted tokens."""
    device = next(model.parameters()).device
    blocks = pack_blocks(tokenizer, texts, block_size, max_tokens)
    if not blocks:
        raise ValueError("no text to compute perplexity on")
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        for s in range(0, len(blocks), batch_size):
            chunk = blocks[s: s + batch_size]
            n = max(len(b) for b in chunk)
            ids = torch.full((len(chunk), n), 0, dtype=torch.long)
            labels = torch.full((len(chunk), n), -100, dtype=torch.long)
            for i, b in enumerate(chunk):
                ids[i, : len(b)] = torch.tensor(b)
                labels[i, : len(b)] = torch.tensor(b)
            ids, labels = ids.to(device), labels.to(device)
            with ctx:
                logits = model(input_ids=ids).logits
            lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
            nll += lp.item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
