"""The Patch artifact: a directory with patch.json and tensors.safetensors, and the registry of kinds.

A patch is made against one base (name, architecture, fingerprint). Its kind (lora, mos, merged, drop,
router, ...) says how its tensors turn into modules on that base. Kinds register by decorator or by the
`patchlm.kinds` entry-point group, so a new kind never touches this file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch

from patchlm.errors import BaseMismatchError, PatchFormatError, UnknownNameError, did_you_mean
from patchlm.paths import atomic_dir, reject_constant, strict_json

FORMAT_VERSION = 1
META_FILE = "patch.json"
TENSOR_FILE = "tensors.safetensors"


# ---------------------------------------------------------------- kinds
STAGES = ("weight", "depth")  # the order patches stack in: weight patches first, then depth patches
CAPABILITIES = ("materialize", "export-peft", "export-merged")


class PatchKind:
    """How one kind of patch attaches to a model. Subclasses register with @register_kind("name", stage=...).

    stage: "weight" (changes weights or adds modules beside them: lora, mos, merged, ...) or "depth" (removes or
    routes whole modules: drop, router); weight patches are applied before depth patches, whatever the order
    they are given in. capabilities: "materialize" (the kind has `materialize(patch) -> Patch`, an equivalent
    LoRA patch; merging, federated aggregation and PEFT export then accept it), "export-peft" (PEFT directory),
    "export-merged" (a plain transformers checkpoint with the patch baked in).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "weight"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    saves_as: ClassVar[str | None] = None  # a training-time kind whose result is a patch of another kind

    def attach(self, model: torch.nn.Module, spec: dict, tensors: dict[str, torch.Tensor] | None = None,
               seed: int = 0) -> dict:
        """Install the patch's modules on `model` (fresh init from `seed` when tensors is None).

        Returns the resolved spec (defaults filled in, e.g. the target module list); the caller's dict is not
        changed."""
        raise NotImplementedError

    def detach(self, model: torch.nn.Module) -> None:
        """Remove what attach installed, restoring the base modules."""
        raise NotImplementedError

    def state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to save (detached, contiguous, on CPU)."""
        raise NotImplementedError

    def exact_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Tensors that restore training bit for bit when state() alone does not (a dense delta W - W0 loses
        rounding when added back); the trainer's checkpoints store them. None: state() is exact."""
        return None

    def load_exact_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put exact_state()'s tensors back after attach (resume)."""

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters an optimizer should update."""
        return []

    def count_trainable(self, spec: dict, tensors: dict[str, torch.Tensor]) -> int:
        """Number of trainable parameters the saved patch represents."""
        return sum(t.numel() for t in tensors.values())

    def summary(self, spec: dict, tensors: dict[str, torch.Tensor]) -> dict:
        """Kind-specific facts for `patchlm info` (e.g. the equivalent LoRA rank)."""
        return {}


_KINDS: dict[str, type[PatchKind]] = {}
_ENTRY_POINTS_LOADED = False


def register_kind(name: str, *, stage: str = "weight", capabilities: tuple[str, ...] = ()):
    """Class decorator: make a PatchKind available under `name`, with its stage and capabilities."""
    if stage not in STAGES:
        raise ValueError(f"kind {name}: stage must be one of {STAGES}, got {stage!r}")
    bad = set(capabilities) - set(CAPABILITIES)
    if bad:
        raise ValueError(f"kind {name}: unknown capabilities {sorted(bad)}; known: {CAPABILITIES}")

    def deco(cls: type[PatchKind]) -> type[PatchKind]:
        cls.name = name
        cls.stage = stage
        cls.capabilities = frozenset(capabilities)
        if "materialize" in capabilities and not callable(getattr(cls, "materialize", None)):
            raise TypeError(f"kind {name} declares 'materialize' but has no materialize(patch) method")
        _KINDS[name] = cls
        return cls

    return deco


def kind_can(name: str, capability: str) -> bool:
    """Whether kind `name` declared `capability` when it registered."""
    return capability in get_kind(name).capabilities


def stack_order(patches: list) -> list:
    """Patches in the order they must be applied: by stage (weight, then depth), stable within a stage."""
    return sorted(patches, key=lambda p: STAGES.index(get_kind(p.kind).stage))


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="patchlm.kinds"):
        if ep.name not in _KINDS:
            try:
                ep.load()
            except ImportError:  # a plugin with a missing dependency must not break the others
                continue


def get_kind(name: str) -> PatchKind:
    """An instance of the registered kind `name`."""
    if name not in _KINDS:
        _load_entry_points()
    if name not in _KINDS:
        raise UnknownNameError(f"unknown patch kind {name!r}; {did_you_mean(name, kinds())}")
    return _KINDS[name]()


def kinds() -> list[str]:
    _load_entry_points()
    return sorted(_KINDS)


# ---------------------------------------------------------------- the artifact
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors holding NaN or infinity (a diverged run's patch is garbage): name `where` and the tensor."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise PatchFormatError(f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s) of "
                                   f"{t.numel()}; the patch is unusable (retrain it, e.g. with a lower lr)")


def provenance(**extra: Any) -> dict:
    """Who made a patch and with what: versions, time, and whatever the caller adds (command, data, seed)."""
    import platform
    import sys

    import transformers

    from patchlm import __version__

    prov = {"patchlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("patchlm") else None}
    prov.update({k: v for k, v in extra.items() if v is not None})
    return prov


@dataclass
class Patch:
    """A patch: a kind, the base it was made for, its spec, its tensors, and where it came from."""

    kind: str
    base: dict
    spec: dict
    tensors: dict[str, torch.Tensor]
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    signatures: list = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    path: Path | None = None

    # -- facts
    @property
    def trainable_params(self) -> int:
        return get_kind(self.kind).count_trainable(self.spec, self.tensors)

    def info(self) -> dict:
        """What `patchlm info` prints."""
        out = {"kind": self.kind, "base": self.base, "trainable_params": self.trainable_params,
               "num_tensors": len(self.tensors), "spec": self.spec, "metrics": self.metrics,
               "provenance": self.provenance, "format_version": self.format_version}
        out.update(get_kind(self.kind).summary(self.spec, self.tensors))
        if self.path is not None:
            f = Path(self.path) / TENSOR_FILE
            out["file_bytes"] = f.stat().st_size if f.exists() else None
            out["path"] = str(self.path)
        return out

    # -- base checks
    def check_base(self, base, force: bool = False) -> None:
        """Refuse a base other than the one this patch was made for (architecture always, weights unless force)."""
        arch, fp = base.architecture, base.fingerprint
        if self.base.get("architecture") and self.base["architecture"] != arch:
            raise BaseMismatchError(f"patch was made for a {self.base['architecture']} ({self.base.get('name')}), "
                                    f"not for {base.name} ({arch})")
        if not force and self.base.get("fingerprint") and self.base["fingerprint"] != fp:
            raise BaseMismatchError(f"patch was made for base {self.base.get('name')} with fingerprint "
                                    f"{self.base['fingerprint']}, but {base.name} has fingerprint {fp}; "
                                    "use the base it was trained on (or port it, or pass --force)")

    def apply(self, base, force: bool = False, seed: int | None = None) -> torch.nn.Module:
        """Attach this patch onto `base.model` (after checking the base) and return the model."""
        self.check_base(base, force=force)
        check_finite(self.tensors, f"patch {self.path or self.kind}")
        get_kind(self.kind).attach(base.model, dict(self.spec), self.tensors,
                                   seed=self.spec.get("seed", 0) if seed is None else seed)
        return base.model

    # -- I/O
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the patch directory atomically (a temp dir renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        check_finite(tensors, f"refusing to save patch {path}")
        with atomic_dir(path, force=force) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"kind": self.kind, "format": "patchlm"})
            meta = {"format_version": self.format_version, "kind": self.kind, "base": self.base,
                    "spec": self.spec, "provenance": self.provenance, "metrics": self.metrics,
                    "signatures": self.signatures, "tensors_sha256": _sha256(tmp / TENSOR_FILE),
                    "trainable_params": get_kind(self.kind).count_trainable(self.spec, tensors)}
            text = strict_json(meta, f"{path / META_FILE}", indent=2, default=_json_default)
            (tmp / META_FILE).write_text(text + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read a patch directory, checking its files, checksum, format version and kind."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise PatchFormatError(f"no patch at {path}: expected a directory with {META_FILE} and {TENSOR_FILE}")
        meta_f, ten_f = path / META_FILE, path / TENSOR_FILE
        for f in (meta_f, ten_f):
            if not f.exists():
                raise PatchFormatError(f"patch {path} is missing {f.name}")
        try:
            meta = json.loads(meta_f.read_text(), parse_constant=reject_constant)
        except json.JSONDecodeError as e:
            raise PatchFormatError(f"{meta_f} is not valid JSON ({e.msg} at line {e.lineno})") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise PatchFormatError(f"{meta_f} is not valid JSON: {e}") from e
        check_meta(meta, meta_f)
        version = meta["format_version"]
        get_kind(meta["kind"])  # unknown kind -> clear error
        want = meta.get("tensors_sha256")
        if want and _sha256(ten_f) != want:
            raise PatchFormatError(f"{ten_f} does not match the checksum in {META_FILE}: truncated or corrupt")
        try:
            tensors = load_file(str(ten_f))
        except (SafetensorError, OSError, ValueError) as e:
            raise PatchFormatError(f"{ten_f} is not a readable safetensors file: {e}") from e
        check_finite(tensors, str(ten_f))
        return cls(kind=meta["kind"], base=meta["base"], spec=meta["spec"], tensors=tensors,
                   provenance=meta.get("provenance") or {}, metrics=meta.get("metrics") or {},
                   signatures=meta.get("signatures") or [], format_version=version, path=path)


# patch.json's fields and the JSON types they must have (required ones first)
META_TYPES: dict[str, tuple[type, ...]] = {"format_version": (int,), "kind": (str,), "base": (dict,), "spec": (dict,),
                                           "provenance": (dict,), "metrics": (dict,), "signatures": (list,),
                                           "tensors_sha256": (str,), "trainable_params": (int,)}
REQUIRED_META = ("format_version", "kind", "base", "spec")
BASE_TYPES = {"name": str, "architecture": str, "fingerprint": str}


def check_meta(meta: Any, where: Path | str) -> None:
    """Refuse a patch.json that is not an object of the documented fields and types, naming the field."""
    if not isinstance(meta, dict):
        raise PatchFormatError(f"{where} must hold a JSON object, not {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise PatchFormatError(f"{where} has format_version {version!r}; this patchlm reads {FORMAT_VERSION}")
    for key in REQUIRED_META:
        if key not in meta:
            raise PatchFormatError(f"{where} has no {key!r} field")
    for key, types in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (value is not None or key in REQUIRED_META) and (
                not isinstance(value, types) or isinstance(value, bool)):
            raise PatchFormatError(f"{where}: field {key!r} must be a {types[0].__name__}, "
                                   f"not {type(value).__name__} ({_short(value)})")
    for key, typ in BASE_TYPES.items():
        value = meta["base"].get(key)
        if value is not None and not isinstance(value, typ):
            raise PatchFormatError(f"{where}: field 'base.{key}' must be a {typ.__name__}, not "
                                   f"{type(value).__name__} ({_short(value)})")
    if any(not isinstance(k, str) or not k for k in meta["spec"]):
        raise PatchFormatError(f"{where}: field 'spec' has an empty key")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_default(o):
    if isinstance(o, (torch.dtype, Path)):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
