"""Full fine-tuning as a patch: the base's linear weights themselves train, and the result is saved as a dense
delta (W - W0 per module) in the `merged` kind, so it applies, merges and exports like any merged patch.

What trains: every nn.Linear chosen by `targets` (default all-linear: the attention and MLP projections of every
decoder layer); embeddings, norms and the output head stay frozen (the head is tied to the embedding in the
built-in models). W0 is not kept in memory: attach writes a snapshot of the targeted weights to a temporary
safetensors file (one tensor at a time) and state() / detach() read it back tensor by tensor, so training holds
one copy of the weights, as zeroth-order training needs to stay at inference memory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from patchlm.adapters.config import check_spec_keys, spec_keys
from patchlm.adapters.inject import resolve_targets
from patchlm.errors import PatchFormatError
from patchlm.patch import PatchKind, register_kind
from patchlm.paths import home
from patchlm.typed import check_fields

DELTA = ".delta"  # the merged kind's tensor suffix


@dataclass
class FullConfig:
    targets: str = field(default="all-linear", metadata={
        "help": "full fine-tuning: the linear modules whose weights train (preset or names)"})

    def __post_init__(self):
        check_fields(self)


class _Snapshot:
    """The original weights of the trained modules, on disk, read back one tensor at a time."""

    def __init__(self, model: nn.Module, names: list[str]):
        from safetensors.torch import save_file

        self.dir = Path(tempfile.mkdtemp(prefix="full-w0-", dir=home()))
        self.names = list(names)
        atexit.register(self.close)
        for i, n in enumerate(self.names):  # one file per tensor: nothing bigger than one weight is built
            w = model.get_submodule(n).weight.detach().cpu().contiguous()
            save_file({"w": w}, str(self.dir / f"{i}.safetensors"))

    def read(self, name: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"{self.names.index(name)}.safetensors"))["w"]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@register_kind("full", stage="weight", capabilities=("export-merged",))
class FullKind(PatchKind):
    """spec: targets (+ seed). Trains W in place; saves `<module>.delta` = W - W0 as a `merged` patch."""

    saves_as = "merged"

    def attach(self, model, spec, tensors=None, seed=0):
        resolved = ("method", "modules")  # what attach adds to the spec it returns
        check_spec_keys(FullConfig, {k: v for k, v in spec.items() if k not in resolved}, "full")
        cfg = FullConfig(**{k: v for k, v in spec.items() if k in spec_keys(FullConfig) and k != "seed"})
        names = resolve_targets(model, spec["modules"] if spec.get("modules") else cfg.targets)
        if tensors is not None:
            extra = sorted(k for k in tensors if not (k.endswith(DELTA) and k[: -len(DELTA)] in names))
            if extra:
                raise PatchFormatError(f"full fine-tuning checkpoint has tensors for other modules: {extra[:3]}")
        if getattr(model, "_patchlm_full", None) is not None:
            raise PatchFormatError("this model already has a full fine-tuning patch attached; detach it first")
        for p in model.parameters():
            p.requires_grad_(False)
        model._patchlm_full = (_Snapshot(model, names), names)  # on the model: any FullKind instance detaches it
        with torch.no_grad():
            for n in names:
                w = model.get_submodule(n).weight
                if tensors is not None and f"{n}{DELTA}" in tensors:
                    d = tensors[f"{n}{DELTA}"]
                    if tuple(d.shape) != tuple(w.shape):
                        raise PatchFormatError(f"delta for {n} has shape {list(d.shape)}, the weight {list(w.shape)}")
                    w.add_(d.to(w.dtype, copy=False).to(w.device))
                w.requires_grad_(True)
        return {"method": "full", "targets": cfg.targets, "modules": names,
                **({"seed": spec["seed"]} if "seed" in spec else {})}

    def detach(self, model):
        snap, names = getattr(model, "_patchlm_full", None) or (None, [])
        if snap is None:
            return
        with torch.no_grad():
            for n in names:
                w = model.get_submodule(n).weight
                w.copy_(snap.read(n).to(w.device))
                w.requires_grad_(False)
        snap.close()
        model._patchlm_full = None

    def state(self, model):
        snap, names = getattr(model, "_patchlm_full", None) or (None, [])
        out = {}
        for n in names:
            w = model.get_submodule(n).weight.detach().float().cpu()
            out[f"{n}{DELTA}"] = (w - snap.read(n).float()).contiguous()
        return out

    def exact_state(self, model):
        _, names = getattr(model, "_patchlm_full", None) or (None, [])
        return {n: model.get_submodule(n).weight.detach().cpu().contiguous() for n in names}

    def load_exact_state(self, model, tensors):
        with torch.no_grad():
            for n, w in tensors.items():
                model.get_submodule(n).weight.copy_(w)

    def trainable_parameters(self, model):
        _, names = getattr(model, "_patchlm_full", None) or (None, [])
        return [model.get_submodule(n).weight for n in names]

    def summary(self, spec, tensors):
        return {"num_modules": len(tensors)}
