"""Merge dense safetensors checkpoints tensor by tensor.

For each tensor name the base's tensor is read, then each model's tensor is read when the method asks for
it (`safe_open` per read, so nothing stays mapped), and the result is appended to an output file whose
header was written up front (every output name, dtype and shape is known from the input headers). Memory
is a few tensors, whatever the number of models. `merge_state_dicts` runs the same code on in-memory
state dicts, so the two give the same bits.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from patchlm.errors import BaseMismatchError, ConfigError, PatchlmError
from patchlm.merge.config import DEFAULT_SHARD_BYTES
from patchlm.merge.methods import merge_tensor
from patchlm.merge.plan import MergePlan
from patchlm.models.checkpoint import ST_DTYPES, ST_NAMES, Checkpoint
from patchlm.paths import atomic_dir

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------- reading
class DictSource:
    """An in-memory state dict with the Checkpoint reading interface (for merge_state_dicts and tests)."""

    def __init__(self, ref: str, state: dict[str, torch.Tensor], config: dict | None = None):
        self.ref, self.state, self.config = ref, state, dict(config or {})
        self.meta = {k: ("", ST_NAMES.get(v.dtype, "F32"), tuple(v.shape)) for k, v in state.items()}

    names = Checkpoint.names
    architecture = Checkpoint.architecture
    num_layers = Checkpoint.num_layers

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]


# ---------------------------------------------------------------- writing
class StreamingWriter:
    """Writes safetensors shards whose headers are known in advance; tensors are appended in order.

    Files follow the safetensors layout: u64 header length, JSON header (padded to 8 bytes), raw data.
    """

    def __init__(self, out_dir: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None):
        self.out_dir = out_dir
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            n = _nbytes(dtype, shape)
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, n))
            size += n
        total = len(shards)
        self.files = (["model.safetensors"] if total == 1 else
                      [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)])
        self.order = [(e[0], e[1], e[2], i) for i, s in enumerate(shards) for e in s]
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_size = sum(e[3] for s in shards for e in s)
        self._pos = 0
        self._shard = -1
        self._fh = None

    def _open(self, i: int) -> None:
        if self._fh:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        off = 0
        for name, dtype, shape, n in self.shards[i]:
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.files[i], "wb")  # noqa: SIM115 - held across write() calls, closed by close()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape, shard = self.order[self._pos]
        if name != want or tuple(tensor.shape) != tuple(shape):
            raise PatchlmError(f"internal: expected tensor {want} {tuple(shape)}, got {name} {tuple(tensor.shape)}")
        if shard != self._shard:
            self._open(shard)
        t = tensor.detach().to("cpu", dtype).contiguous()
        if t.numel():
            self._fh.write(memoryview(t.view(torch.uint8).numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._pos != len(self.order):
            raise PatchlmError(f"internal: wrote {self._pos} of {len(self.order)} tensors")
        if len(self.files) > 1:
            wm = {name: self.files[s] for name, _, _, s in self.order}
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total_size}, "weight_map": wm}, indent=2) + "\n")


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- the merge loop
class _Inputs(Sequence):
    """Model k's tensor (minus the base's for delta methods), read only when indexed."""

    def __init__(self, sources, name: str, base: torch.Tensor | None, dtype: torch.dtype | None):
        self.sources, self.name, self.base, self.dtype = sources, name, base, dtype

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, k: int) -> torch.Tensor:
        src = self.sources[k]
        raw = src.read(self.name)
        t = _cast(raw, self.dtype)
        if self.base is None:
            return t
        if getattr(src, "fresh_reads", False) or t is not raw:
            return t.sub_(self.base)  # our own copy: subtract in place (same bits, one tensor less)
        return t - self.base


class _Fishers(Sequence):
    def __init__(self, fishers: list, name: str, shape):
        self.fishers, self.name, self.shape = fishers, name, shape

    def __len__(self) -> int:
        return len(self.fishers)

    def __getitem__(self, k: int) -> torch.Tensor:
        f = self.fishers[k]
        if isinstance(f, dict):
            t = f.get(self.name)
        else:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                present = self.name in fh.keys()  # noqa: SIM118 - safe_open has no __contains__
                t = fh.get_tensor(self.name) if present else None
        return torch.ones(self.shape) if t is None else t.float()  # no Fisher for a tensor: plain average


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.float()


def check_compatible(sources: list, base=None) -> list[str]:
    """The tensor names to merge, after checking architectures, names and shapes agree."""
    ref = base or sources[0]
    for s in sources:
        if s is ref:
            continue
        if s.architecture != ref.architecture or s.config.get("model_type") != ref.config.get("model_type"):
            raise BaseMismatchError(f"cannot merge models of different architectures: {ref.ref} is "
                                    f"{ref.architecture} but {s.ref} is {s.architecture}")
        missing = [n for n in ref.meta if n not in s.meta]
        if missing:
            raise BaseMismatchError(f"{s.ref} is missing tensor {missing[0]} that {ref.ref} has "
                                    f"({len(missing)} missing in all)")
        extra = [n for n in s.meta if n not in ref.meta]
        if extra:
            raise BaseMismatchError(f"{ref.ref} is missing tensor {extra[0]} that {s.ref} has "
                                    f"({len(extra)} missing in all)")
        for n, (_, _, shape) in ref.meta.items():
            if s.meta[n][2] != shape:
                raise BaseMismatchError(f"tensor {n} has shape {list(shape)} in {ref.ref} but "
                                        f"{list(s.meta[n][2])} in {s.ref}: different architectures")
    return list(ref.meta)


def run_merge(plan: MergePlan, sources: dict[str, Any], sink: Callable[[str, torch.Tensor], None],
              progress: bool = False) -> list[str]:
    """Merge every tensor of the plan's models (`sources`: ref -> Checkpoint/DictSource) into `sink`."""
    method = plan.method
    base = sources[plan.base_model] if plan.base_model else None
    inputs = [sources[e.model] for e in plan.inputs()]
    names = check_compatible(list(sources.values()), base)
    ref = base or inputs[0]
    for model, (lo, hi) in plan.layer_ranges.items():
        n = sources[model].num_layers
        if (lo, hi) != (0, n):
            raise ConfigError(f"slices: {model} has layer_range [{lo}, {hi}] but {n} layers; only full ranges "
                              "are supported")
    dtype = TORCH_DTYPES[plan.dtype] if plan.dtype else None
    num_layers = ref.num_layers
    fishers = None
    if method.name == "fisher":
        fishers = [e.parameters.get("fisher", plan.parameters.get("fisher")) for e in plan.inputs()]
        for e, f in zip(plan.inputs(), fishers):
            if not isinstance(f, dict) and not (isinstance(f, (str, Path)) and Path(f).is_file()):
                raise ConfigError(f"fisher merging of checkpoints needs each model's diagonal Fisher: set "
                                  f"parameters: {{fisher: FILE.safetensors}} for {e.model} (got {f!r})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), desc=f"merge {method.name}", unit="tensor", leave=False)
    try:
        for name in names:
            store_dtype = ST_DTYPES.get(ref.meta[name][1], torch.float32)
            if not store_dtype.is_floating_point:
                sink(name, ref.read(name))  # integer buffers are copied from the base
                continue
            shared, per_model = plan.params_for(name, num_layers)
            base_t = _cast(base.read(name), dtype) if base is not None else None
            xs = _Inputs(inputs, name, base_t, dtype) if method.space == "delta" else _Inputs(inputs, name, None, dtype)
            extra = {"fisher": _Fishers(fishers, name, ref.meta[name][2])} if fishers is not None else None
            out = merge_tensor(method, name, base_t, xs, per_model, shared, seed=plan.seed, per_model_inputs=extra)
            del base_t, xs
            sink(name, out)
            del out
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    return names


def out_dtype_for(plan: MergePlan, stored: str) -> torch.dtype:
    if plan.out_dtype:
        return TORCH_DTYPES[plan.out_dtype]
    if plan.dtype:
        return TORCH_DTYPES[plan.dtype]
    return ST_DTYPES.get(stored, torch.float32)


def merge_state_dicts(plan: MergePlan, states: dict[str, dict[str, torch.Tensor]],
                      configs: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """The same merge on in-memory state dicts (ref -> {name: tensor}); returns the merged state dict."""
    plan.validate()
    configs = configs or {}
    sources = {r: DictSource(r, s, configs.get(r)) for r, s in states.items()}
    _check_refs(plan, sources)
    ref = sources[plan.base_model] if plan.base_model else sources[plan.inputs()[0].model]
    out: dict[str, torch.Tensor] = {}

    def sink(name, t):
        out[name] = t.to(out_dtype_for(plan, ref.meta[name][1])) if t.is_floating_point() else t

    run_merge(plan, sources, sink)
    return out


def _check_refs(plan: MergePlan, sources: dict) -> None:
    for e in plan.models:
        if e.model not in sources:
            raise ConfigError(f"no weights for model {e.model}")


def merge_checkpoints(plan: MergePlan, out: str | Path, force: bool = False,
                      shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> dict:
    """Stream-merge the plan's checkpoints into a Hugging Face checkpoint directory `out` (atomic)."""
    plan.validate()
    t0 = time.perf_counter()
    sources = {e.model: Checkpoint(e.model) for e in plan.models}
    if plan.base_model and plan.base_model not in sources:
        sources[plan.base_model] = Checkpoint(plan.base_model)
    ref = sources[plan.base_model] if plan.base_model else sources[plan.models[0].model]
    names = check_compatible(list(sources.values()), sources.get(plan.base_model))
    entries = [(n, out_dtype_for(plan, ref.meta[n][1]) if ST_DTYPES.get(ref.meta[n][1], torch.float32).is_floating_point
                else ST_DTYPES[ref.meta[n][1]], ref.meta[n][2]) for n in names]
    with atomic_dir(out, force=force) as tmp:
        writer = StreamingWriter(tmp, entries, shard_bytes=shard_bytes,
                                 metadata={"merged_by": "patchlm", "merge_method": plan.merge_method})
        try:
            run_merge(plan, sources, writer.write, progress=progress)
        except BaseException:
            if writer._fh:
                writer._fh.close()
            raise
        writer.close()
        _write_side_files(plan, sources, ref, tmp)
    report = {"out": str(out), "merge_method": plan.merge_method, "models": [e.model for e in plan.models],
              "base_model": plan.base_model, "tensors": len(names), "shards": len(writer.files),
              "bytes": writer.total_size, "seconds": round(time.perf_counter() - t0, 3)}
    return report


def _write_side_files(plan: MergePlan, sources: dict, ref, tmp: Path) -> None:
    import yaml

    cfg = dict(ref.config)
    dt = plan.out_dtype or plan.dtype
    if dt:
        cfg["dtype"] = dt
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dt
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (ref.path / "generation_config.json").exists():
        shutil.copy(ref.path / "generation_config.json", tmp / "generation_config.json")
    tok_src = ref
    if plan.tokenizer_source and plan.tokenizer_source != "base":
        tok_src = sources[plan.tokenizer_source]
    for fn in TOKENIZER_FILES:
        if (tok_src.path / fn).exists():
            shutil.copy(tok_src.path / fn, tmp / fn)
    (tmp / "merge_config.yml").write_text(yaml.safe_dump(_plan_yaml(plan), sort_keys=False))


def _plan_yaml(plan: MergePlan) -> dict:
    d: dict[str, Any] = {"models": [{"model": e.model, **({"parameters": e.parameters} if e.parameters else {})}
                                    for e in plan.models], "merge_method": plan.merge_method}
    for k in ("base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"):
        v = getattr(plan, k)
        if v:
            d[k] = v
    if plan.seed:
        d["seed"] = plan.seed
    return d
