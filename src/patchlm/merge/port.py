"""PortLLM: re-target a patch made on one base to an updated base of the same architecture, without training.

The patch's tensors are kept as they are (theta' + dW); what changes is the base it is recorded against.
Checks: the architecture matches and the patch attaches to the new base (every module exists with the
right shape); the new base must look like an update of the patch's base (mean per-column cosine of the
patched modules' weights above `min_similarity`, streamed from both checkpoints) unless `force`. The new
patch records the old and the new fingerprints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError, PatchlmError
from patchlm.merge.glue import column_cosine
from patchlm.merge.patch_merge import PatchDeltas
from patchlm.models import load_base
from patchlm.models.base import cached_fingerprint
from patchlm.models.checkpoint import Checkpoint, resolve_checkpoint
from patchlm.models.fingerprint import fingerprint_checkpoint
from patchlm.patch import Patch, get_kind
from patchlm.typed import check_fields


@dataclass
class PortConfig:
    """PortLLM's one knob (besides force): how much the new base must look like the old one."""

    min_similarity: float = field(default=0.9, metadata={
        "help": "weight similarity (mean per-column cosine of the patched modules) the new base must have to the old"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not -1 <= self.min_similarity <= 1:
            raise ConfigError(f"min_similarity must be in [-1, 1], got {self.min_similarity}", field="min_similarity")


@dataclass
class BaseInfo:
    """What porting needs to know about a base without loading its weights: a meta-device model (module
    names and shapes), its architecture, and its fingerprint computed by streaming the checkpoint."""

    name: str
    path: str
    model: Any
    fingerprint: str

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None)
        return archs[0] if archs else type(self.model).__name__

    def ref(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "fingerprint": self.fingerprint}


def inspect_base(ref: str) -> BaseInfo:
    """A BaseInfo for a built-in name or checkpoint dir, streaming instead of loading; falls back to load_base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_checkpoint(ref)
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    fp = cached_fingerprint(path) or fingerprint_checkpoint(Checkpoint(str(path)), model)
    if fp is None:
        b = load_base(ref)
        return BaseInfo(b.name, b.path or ref, b.model, b.fingerprint)
    return BaseInfo(ref, str(path), model, fp)


def lineage_similarity(old_ref: str, new_ref: str, modules: list[str]) -> float:
    """Mean per-column cosine between the two checkpoints' weights of `modules` (one tensor pair at a time)."""
    old, new = Checkpoint(old_ref), Checkpoint(new_ref)
    names = [f"{m}.weight" for m in modules if f"{m}.weight" in old.meta and f"{m}.weight" in new.meta]
    if not names:
        raise PatchlmError(f"{old_ref} and {new_ref} share none of the patch's modules")
    total = 0.0
    for n in names:
        if old.meta[n][2] != new.meta[n][2]:
            raise BaseMismatchError(f"{n} has shape {list(old.meta[n][2])} in {old_ref} but "
                                    f"{list(new.meta[n][2])} in {new_ref}")
        total += column_cosine(old.read(n), new.read(n))
    return total / len(names)


def check_attaches(patch: Patch, base) -> None:
    """Attach the patch to `base` and detach it again: shape and module checks, no change left behind."""
    kind = get_kind(patch.kind)
    try:
        kind.attach(base.model, dict(patch.spec), patch.tensors, seed=patch.spec.get("seed", 0))
    except PatchFormatError as e:
        raise BaseMismatchError(f"patch does not fit {base.name}: {e}") from e
    finally:
        try:
            kind.detach(base.model)
        except Exception:
            pass


def patch_modules(patch: Patch) -> list[str]:
    """The modules a patch changes (its dW modules; else the module names of its tensors)."""
    try:
        return PatchDeltas(patch).modules
    except PatchFormatError:
        return sorted({k.rsplit(".", 1)[0] for k in patch.tensors})


def port_patch(patch: Patch, new_base, old_base: str | None = None, force: bool = False,
               min_similarity: float = PortConfig.min_similarity) -> tuple[Patch, dict]:
    """The patch re-targeted to `new_base` and a report of the checks.

    new_base: a loaded Base, or a built-in name / checkpoint dir (inspected by streaming: porting then needs
    memory for a few tensors, not the model). old_base: the checkpoint the patch was made on (default: the
    name recorded in the patch).
    """
    t0 = time.perf_counter()
    if isinstance(new_base, (str, Path)):
        new_base = inspect_base(str(new_base))
    old = dict(patch.base)
    new_ref = new_base.ref()
    if old.get("architecture") and old["architecture"] != new_base.architecture:
        raise BaseMismatchError(f"patch was made for a {old['architecture']} ({old.get('name')}), "
                                f"but {new_base.name} is a {new_base.architecture}: porting needs the same "
                                "architecture")
    check_attaches(patch, new_base)
    report = {"old_base": old.get("name"), "old_fingerprint": old.get("fingerprint"), "new_base": new_base.name,
              "new_fingerprint": new_base.fingerprint, "identical_base": old.get("fingerprint") == new_base.fingerprint,
              "similarity": None, "min_similarity": min_similarity, "forced": False}
    if not report["identical_base"]:
        old_src = old_base or old.get("name")
        reason = None
        try:
            old_path = resolve_checkpoint(old_src) if old_src else None
        except PatchlmError:
            old_path = None
        if old_path is None:
            reason = (f"cannot check that {new_base.name} (fingerprint {new_base.fingerprint}) is an update of the "
                      f"patch's base {old.get('name')} (fingerprint {old.get('fingerprint')}): that base is not "
                      "available; give it with --from OLD_BASE")
        else:
            cached = cached_fingerprint(old_path)
            if cached and old.get("fingerprint") and cached != old["fingerprint"]:
                reason = (f"--from {old_src} has fingerprint {cached}, but the patch was made on "
                          f"{old.get('name')} with fingerprint {old.get('fingerprint')}")
            else:
                new_src = new_base.path or new_base.name
                sim = lineage_similarity(str(old_path), str(new_src), patch_modules(patch))
                report["similarity"] = sim
                if sim < min_similarity:
                    reason = (f"{new_base.name} (fingerprint {new_base.fingerprint}) does not look like an update of "
                              f"the patch's base {old.get('name')} (fingerprint {old.get('fingerprint')}): weight "
                              f"similarity {sim:.4f} < {min_similarity}")
        if reason:
            if not force:
                raise BaseMismatchError(reason + "; pass --force to port anyway")
            report["forced"] = True
            report["forced_reason"] = reason
    prov = dict(patch.provenance)
    prov["ported"] = {"from_base": old, "to_base": new_ref, "old_fingerprint": old.get("fingerprint"),
                      "new_fingerprint": new_base.fingerprint, "similarity": report["similarity"],
                      "forced": report["forced"], "source_patch": str(patch.path) if patch.path else None,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    metrics = {"metrics_on_old_base": patch.metrics} if patch.metrics else {}
    ported = Patch(kind=patch.kind, base=new_ref, spec=dict(patch.spec), tensors=dict(patch.tensors),
                   provenance=prov, metrics=metrics, signatures=[])
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return ported, report
