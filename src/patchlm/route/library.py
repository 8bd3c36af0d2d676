"""A patch library: a directory of LoRA experts of one base, each with a task description and example inputs.

    LIB/library.json         the index: format, the base (name, architecture, fingerprint), the experts in order
    LIB/experts/<name>/      each expert as a LoRA patch (MoS and other materializable kinds in their LoRA form)
    LIB/gates/               Phatgoose gate vectors trained for this library (route/gates.py)

An expert of another base is refused when it is added, naming both fingerprints. The library id (a hash of the
experts' names and tensor checksums) ties trained gates to the exact experts they were trained with.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from patchlm.adapters.peft_io import to_lora_patch
from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError
from patchlm.patch import META_FILE, Patch
from patchlm.paths import atomic_write_text, reject_constant, strict_json

INDEX = "library.json"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Expert:
    """One library entry: its name, where its patch lies, what task it serves and a few inputs of that task."""

    name: str
    path: str
    description: str = ""
    examples: list[str] = field(default_factory=list)
    task: str | None = None
    kind: str = "lora"
    tensors_sha256: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "description": self.description, "examples": self.examples,
                "task": self.task, "kind": self.kind, "tensors_sha256": self.tensors_sha256}


def read_examples(path: str | Path) -> list[str]:
    """Example inputs from a file: JSONL (strings, or objects with a "text" or "question" field) or plain lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"examples file {p} does not exist", field="examples")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise ConfigError(f"examples file {p} is not UTF-8 text: {e}", field="examples") from e
    out = []
    for i, ln in enumerate(lines, 1):
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(ln, parse_constant=reject_constant)
            except ValueError as e:
                raise ConfigError(f"{p} line {i} is not JSON: {e}", field="examples") from e
            if isinstance(obj, dict):
                obj = obj.get("text", obj.get("question"))
            if not isinstance(obj, str) or not obj.strip():
                raise ConfigError(f"{p} line {i}: expected a string or an object with a 'text' field",
                                  field="examples")
            out.append(obj.strip())
        else:
            out.append(ln)
    if not out:
        raise ConfigError(f"examples file {p} holds no examples", field="examples")
    return out


class Library:
    """An opened library directory (`Library.open`, `Library.create`); `add` writes an expert and the index."""

    def __init__(self, path: Path, base: dict | None, experts: list[Expert]):
        self.path, self.base, self.experts = Path(path), base, experts

    # -- I/O
    @classmethod
    def open(cls, path: str | Path) -> Library:
        """Read LIB/library.json (refusing a missing or malformed index)."""
        path = Path(path)
        f = path / INDEX
        if not f.is_file():
            raise ConfigError(f"no patch library at {path} (no {INDEX}); create one with "
                              f"`patchlm route library add {path} PATCH --description TEXT`", field="library")
        try:
            meta = json.loads(f.read_text(encoding="utf-8"), parse_constant=reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise PatchFormatError(f"{f} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise PatchFormatError(f"{f} is not a patchlm library index of format {FORMAT_VERSION}")
        try:
            experts = [Expert(**e) for e in meta.get("experts", [])]
        except TypeError as e:
            raise PatchFormatError(f"{f} has a malformed expert entry: {e}") from e
        return cls(path, meta.get("base"), experts)

    @classmethod
    def open_or_create(cls, path: str | Path) -> Library:
        path = Path(path)
        if (path / INDEX).exists():
            return cls.open(path)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"{path} exists and is not a patch library (no {INDEX}): choose an empty or new "
                              "directory", field="library")
        return cls(path, None, [])

    def save_index(self) -> None:
        meta = {"format_version": FORMAT_VERSION, "base": self.base, "experts": [e.to_json() for e in self.experts]}
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / INDEX, strict_json(meta, str(self.path / INDEX), indent=2) + "\n")

    # -- facts
    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def library_id(self) -> str:
        """A hash of the experts' names and tensor checksums, in order: what trained gates are tied to."""
        h = hashlib.sha256(b"patchlm-library-v1\0")
        for e in self.experts:
            h.update(f"{e.name}\0{e.tensors_sha256}\0".encode())
        return h.hexdigest()[:16]

    def expert(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise ConfigError(f"library {self.path} has no expert {name!r}; it has: {', '.join(self.names) or 'none'}",
                          field="expert")

    def require_experts(self) -> None:
        if not self.experts:
            raise ConfigError(f"library {self.path} has no experts: add some with "
                              f"`patchlm route library add {self.path} PATCH --description TEXT`", field="library")

    def require_global_inputs(self) -> None:
        """The global router writes each expert's instruction from its description and examples: say who lacks them."""
        for e in self.experts:
            if not e.description.strip():
                raise ConfigError(f"expert {e.name} of library {self.path} has no task description; GLIDER's global "
                                  "router needs one: add it again with --description TEXT --force", field="library")
            if not e.examples:
                raise ConfigError(f"expert {e.name} of library {self.path} has no example inputs; GLIDER's global "
                                  "router writes its task instruction from them: add it again with --examples FILE "
                                  "--force", field="library")

    def patch(self, name: str) -> Patch:
        e = self.expert(name)
        p = Patch.load(self.path / e.path)
        if p.kind != "lora":
            raise PatchFormatError(f"expert {name} in {self.path} is a {p.kind} patch, not LoRA")
        return p

    def patches(self) -> list[Patch]:
        return [self.patch(n) for n in self.names]

    def check_base(self, base) -> None:
        """Refuse a base other than the library's (architecture and fingerprint), naming both fingerprints."""
        if not self.base:
            return
        if self.base.get("architecture") and self.base["architecture"] != base.architecture:
            raise BaseMismatchError(f"library {self.path} holds experts of a {self.base['architecture']} "
                                    f"({self.base.get('name')}), not of {base.name} ({base.architecture})")
        if self.base.get("fingerprint") and self.base["fingerprint"] != base.fingerprint:
            raise BaseMismatchError(f"library {self.path} holds experts of base {self.base.get('name')} with "
                                    f"fingerprint {self.base['fingerprint']}, but {base.name} has fingerprint "
                                    f"{base.fingerprint}")

    # -- changes
    def add(self, patch_path: str | Path, description: str, examples: list[str] | None = None,
            name: str | None = None, task: str | None = None, force: bool = False) -> Expert:
        """Copy a patch (in its LoRA form) into the library as an expert and rewrite the index."""
        if not description or not description.strip():
            raise ConfigError("an expert needs a task description (the global router writes its instruction from "
                              "it)", field="description")
        src = Patch.load(patch_path)
        name = name or Path(patch_path).resolve().name
        if name in ("best", "last", "patch"):  # a trainer's output dir: name it after the run instead
            name = Path(patch_path).resolve().parent.name if name == "patch" else \
                Path(patch_path).resolve().parent.parent.name
        if not NAME_RE.match(name):
            raise ConfigError(f"expert name {name!r} must be 1-64 letters, digits, '_', '-' or '.'", field="name")
        lora = to_lora_patch(src)
        ref = {k: src.base.get(k) for k in ("name", "architecture", "fingerprint")}
        mine = (self.base or {}).get("fingerprint"), (self.base or {}).get("architecture")
        if self.base and mine != (ref["fingerprint"], ref["architecture"]):
            raise BaseMismatchError(
                f"patch {patch_path} was made for base {ref['name']} ({ref['architecture']}, fingerprint "
                f"{ref['fingerprint']}), but library {self.path} holds experts of {self.base.get('name')} "
                f"({self.base.get('architecture')}, fingerprint {self.base.get('fingerprint')})")
        if name in self.names and not force:
            raise ConfigError(f"library {self.path} already has an expert {name!r}: pass --force to replace it, "
                              "or --name to add it under another name", field="name")
        rel = f"experts/{name}"
        lora.save(self.path / rel, force=True if name in self.names else force)
        sha = json.loads((self.path / rel / META_FILE).read_text())["tensors_sha256"]
        entry = Expert(name=name, path=rel, description=description.strip(), examples=list(examples or []),
                       task=task, kind=src.kind, tensors_sha256=sha)
        self.experts = [entry if e.name == name else e for e in self.experts]
        if name not in self.names:
            self.experts.append(entry)
        self.base = self.base or ref
        self.save_index()
        return entry

    def rows(self) -> list[dict]:
        """One row per expert for `patchlm route library list`."""
        return [{"name": e.name, "kind": e.kind, "task": e.task, "examples": len(e.examples),
                 "description": e.description} for e in self.experts]
