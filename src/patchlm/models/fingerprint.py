"""The one base-weight fingerprint: a hash of tensor names, shapes and float32 values (tied tensors counted once).

Two ways feed the same per-tensor hashing (`TensorHasher`): a loaded state dict (`fingerprint_state_dict`) and a
safetensors checkpoint streamed a block of rows at a time beside a meta-device model (`fingerprint_checkpoint`), so
a base can be fingerprinted without loading it and both give the same string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable

import torch

PREFIX = "blake2b:"


class TensorHasher:
    """Feeds tensors in name order into one blake2b; a tensor whose tie key was seen is hashed as a reference."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._seen: dict[Hashable, str] = {}

    def add(self, name: str, shape: tuple[int, ...], tie_key: Hashable | None,
            blocks: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Hash one tensor: its name, shape, then its values as float32 (consecutive `blocks()` of row-major data).

        Hashing consecutive blocks equals hashing the whole buffer, so the block size never changes the result.
        A tensor with the tie key of an earlier one (tied weights) is hashed as "tied:<first name>" instead."""
        self._h.update(name.encode())
        self._h.update(str(tuple(shape)).encode())
        if self.seen(tie_key):
            self._h.update(b"tied:" + self._seen[tie_key].encode())
            return
        if tie_key is not None:
            self._seen[tie_key] = name
        for block in blocks():
            arr = block.detach().to("cpu", torch.float32).contiguous().numpy()
            self._h.update(memoryview(arr).cast("B"))
            del arr

    def seen(self, tie_key: Hashable | None) -> bool:
        """Whether a tensor with this tie key was hashed already (the next one is hashed as a reference)."""
        return tie_key is not None and tie_key in self._seen

    def hexdigest(self) -> str:
        return PREFIX + self._h.hexdigest()


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> str:
    """The fingerprint of a state dict (tensors sharing storage are tied).

    Values are hashed as float32, so a base loaded in bf16 for speed keeps its fp32 fingerprint only when it was
    fingerprinted before the cast (load_base does so)."""
    h = TensorHasher()
    for name in sorted(state):
        t = state[name]
        h.add(name, tuple(t.shape), t.data_ptr() if t.numel() else None, lambda t=t: (t,))
    return h.hexdigest()


def fingerprint_checkpoint(checkpoint, meta_model: torch.nn.Module, chunk_elements: int = 1 << 22) -> str | None:
    """`fingerprint_state_dict(model.state_dict())` of the model a checkpoint loads into, computed by streaming it.

    `checkpoint` is a reader with `meta` (stored names) and `read_chunks(name, max_elements)`, such as
    `patchlm.models.checkpoint.Checkpoint`; a meta-device model gives the state-dict names and the weight tying.
    None when the state dict has entries the files do not hold (then the model must be loaded to know them)."""
    sd = meta_model.state_dict(keep_vars=True)
    owners: dict[int, list[str]] = {}
    for name, t in sd.items():
        owners.setdefault(id(t), []).append(name)
    h = TensorHasher()
    for name in sorted(sd):
        t = sd[name]
        key = id(t) if t.numel() else None
        stored = None
        if not h.seen(key):
            stored = next((n for n in [name, *owners.get(id(t), [])] if n in checkpoint.meta), None)
            if stored is None:
                return None
        h.add(name, tuple(t.shape), key, lambda s=stored: checkpoint.read_chunks(s, chunk_elements))
    return h.hexdigest()
