"""Reading Hugging Face safetensors checkpoints without loading them: names, dtypes and shapes from the headers,
one tensor (or a block of its rows) at a time, and the resolution of a model reference to a checkpoint directory.

Merging streams checkpoints through this reader, and porting fingerprints an updated base with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from patchlm.errors import PatchFormatError, PatchlmError
from patchlm.models.base import BUILTIN_MODELS, builtin_dir

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def resolve_checkpoint(ref: str) -> Path:
    """A local HF checkpoint directory for a built-in name, a directory, or a hub id already in the cache."""
    if ref in BUILTIN_MODELS:
        return builtin_dir(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if "/" in ref and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception as e:
            raise PatchlmError(f"model {ref!r} is not a local directory and is not in the hub cache: {e}") from e
    raise PatchlmError(f"model {ref!r} not found: expected a checkpoint directory, a built-in name or a cached hub id")


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the header's tensor entries, the offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return head, 8 + n


class Checkpoint:
    """Tensor names, shapes and dtypes of a safetensors checkpoint; `read(name)` loads one tensor.

    Reads are positioned file reads into fresh buffers, not memory maps: a mapped page that was read stays in
    the process's resident set until the file is unmapped, so streaming a whole checkpoint through a map
    makes the process look as large as the checkpoint, while buffers are freed tensor by tensor."""

    def __init__(self, ref: str):
        from safetensors import safe_open

        self.ref = ref
        self.path = resolve_checkpoint(ref)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise PatchlmError(f"{self.path} has no config.json: not a Hugging Face checkpoint")
        self.config = json.loads(cfg.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
        if not files:
            raise PatchlmError(f"{self.path} holds no .safetensors weights (pytorch .bin checkpoints are not "
                               "streamed: re-save with safe_serialization=True)")
        self.meta: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (absolute byte offset, byte length)
        for fn in files:
            head, start = safetensors_header(self.path / fn)
            with safe_open(str(self.path / fn), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    sl = f.get_slice(name)
                    self.meta[name] = (fn, sl.get_dtype(), tuple(sl.get_shape()))
                    b, e = head[name]["data_offsets"]
                    self._where[name] = (start + b, e - b)

    @property
    def names(self) -> list[str]:
        return list(self.meta)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or self.config.get("n_layer") or 0)

    fresh_reads = True  # every read returns a new tensor the caller may modify

    def _read_rows(self, name: str, first: int, count: int | None) -> torch.Tensor:
        """Rows [first, first + count) of the leading dimension (all of the tensor when count is None)."""
        fn, dt, shape = self.meta[name]
        dtype = ST_DTYPES.get(dt)
        if dtype is None:
            raise PatchFormatError(f"{name} in {self.path / fn} has dtype {dt}, which patchlm cannot read")
        offset, nbytes = self._where[name]
        if count is None or len(shape) == 0:
            rows_shape, skip, length = shape, 0, nbytes
        else:
            row_bytes = nbytes // max(1, shape[0])
            count = max(0, min(count, shape[0] - first))
            rows_shape, skip, length = (count, *shape[1:]), first * row_bytes, count * row_bytes
        buf = bytearray(length)
        if length:
            fd = os.open(self.path / fn, os.O_RDONLY)
            try:
                view, done = memoryview(buf), 0
                while done < length:
                    got = os.preadv(fd, [view[done:]], offset + skip + done)
                    if got <= 0:
                        raise PatchFormatError(f"{self.path / fn} is truncated: {name} is cut short")
                    done += got
            finally:
                os.close(fd)
        if not length:
            return torch.empty(rows_shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(rows_shape)

    def read(self, name: str) -> torch.Tensor:
        return self._read_rows(name, 0, None)

    def read_chunks(self, name: str, max_elements: int = 1 << 22):
        """The tensor in consecutive blocks of leading-dimension rows (row-major order), a few MB each."""
        shape = self.meta[name][2]
        if len(shape) == 0 or shape[0] == 0:
            yield self.read(name)
            return
        row = max(1, math.prod(shape[1:]))
        step = max(1, max_elements // row)
        for i in range(0, shape[0], step):
            yield self._read_rows(name, i, step)
