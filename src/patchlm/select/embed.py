"""Sentence embeddings of examples (mean-pooled, L2-normalised, as all-MiniLM-L6-v2 is used), batched and cached.

A cache entry is keyed by the SHA-256 of the encoder's name, the token limit and every text, and stored as
safetensors under $PATCHLM_HOME/select/embeddings: embedding the same pool twice (a second selector, a resumed
run, the benchmark's rows) costs one file read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from patchlm.data.features import example_text
from patchlm.models import load_base
from patchlm.paths import atomic_write_bytes, home

CACHE_VERSION = "v1"


def embedding_text(task, example: dict) -> str:
    """What SHED embeds: the whole example (prompt and answer; a conversation as 'role: content' lines)."""
    return example_text(task, example)


def content_key(texts: Sequence[str], embedder: str, max_length: int) -> str:
    """The cache key of one embedding matrix: a hash of the encoder, the token limit and the texts in order."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0{embedder}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8", errors="replace")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_file(key: str) -> Path:
    return home(create=False) / "select" / "embeddings" / f"{key}.safetensors"


@torch.no_grad()
def encode(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int,
           progress: bool = False) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of `texts` [N, D] (float32), batched by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    bar = None
    if progress and len(texts) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="embed", unit="ex", leave=False)
    model.eval()
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        if out.numel() == 0:
            out = torch.empty(len(texts), pooled.shape[1])
        out[idx] = pooled
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return out


class Embedder:
    """Loads the encoder on first use; `embed(texts)` returns cached embeddings when the same texts were seen."""

    def __init__(self, name: str, batch_size: int, max_length: int, progress: bool = False):
        self.name, self.batch_size, self.max_length, self.progress = name, batch_size, max_length, progress
        self._base = None
        self.hits = 0

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        from safetensors.torch import load_file, save

        texts = list(texts)
        if not texts:
            return torch.empty(0, 0)
        key = content_key(texts, self.name, self.max_length)
        f = cache_file(key)
        if f.exists():
            try:
                self.hits += 1
                return load_file(str(f))["embeddings"]
            except Exception:  # a damaged cache file: embed again and overwrite it
                self.hits -= 1
        if self._base is None:
            self._base = load_base(self.name)
        emb = encode(self._base.model, self._base.tokenizer, texts, self.batch_size, self.max_length, self.progress)
        try:
            atomic_write_bytes(f, save({"embeddings": emb.contiguous()}), mode=0o644)
        except OSError:  # a read-only home just means no cache
            pass
        return emb
