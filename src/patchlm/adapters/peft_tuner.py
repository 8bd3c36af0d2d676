"""The base of the PEFT-backed kinds (VeRA, VB-LoRA): PEFT's tuner layers do the math, patchlm owns the patch.

`attach` injects the tuner into the model in place with `peft.get_peft_model` (forward passes go through the
model itself, so the trainer, evaluation and other patches see an ordinary model); `detach` puts every tuner
layer back to its base layer. The saved tensors are the trainable ones, named `<module>.<name>` after the
model's own module names, so a patch does not depend on PEFT's state-dict layout.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from patchlm.adapters.inject import get_parent, has_module, resolve_targets
from patchlm.errors import PatchFormatError
from patchlm.patch import PatchKind

ADAPTER = "default"  # PEFT's adapter name


class PeftTunerKind(PatchKind):
    """A kind whose modules are a PEFT tuner's layers. Subclasses set `layer_cls()`, `peft_config()`,
    `per_module` (the tensors each module owns) and may add shared tensors through `shared_state`."""

    per_module: tuple[str, ...] = ()
    method: str = ""

    @staticmethod
    def layer_cls() -> type:
        raise NotImplementedError

    def peft_config(self, cfg, names: list[str], seed: int):
        """The PEFT config for config `cfg` over the full module names `names`."""
        raise NotImplementedError

    def shared_state(self, model) -> dict[str, torch.Tensor]:
        """Tensors shared by every module (e.g. VB-LoRA's vector bank)."""
        return {}

    def load_shared(self, model, tensors: dict[str, torch.Tensor]) -> None:
        pass

    # -- helpers
    def layers(self, model) -> dict[str, nn.Module]:
        cls = self.layer_cls()
        return {n: m for n, m in model.named_modules() if isinstance(m, cls)}

    def inject(self, model, cfg, names: list[str], seed: int, tensors: dict | None) -> None:
        """Install the tuner on `names` (torch seeded from `seed` as PEFT initialises) and load `tensors`."""
        from peft import get_peft_model

        missing = [n for n in names if not has_module(model, n)]
        if missing:
            raise PatchFormatError(f"{self.method} patch targets modules this model does not have: "
                                   f"{', '.join(missing[:3])}")
        for n in names:
            if not isinstance(model.get_submodule(n), nn.Linear):
                raise PatchFormatError(f"module {n} is a {type(model.get_submodule(n)).__name__}, not a Linear: "
                                       f"cannot attach {self.method}")
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # transformers' deprecation notice from inside PEFT, not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            get_peft_model(model, self.peft_config(cfg, names, seed))
        for m in self.layers(model).values():  # the model's mode: no adapter dropout in eval mode
            m.train(model.training)
        for n, p in model.named_parameters():
            p.requires_grad_(self._is_adapter(n))
        if tensors is not None:
            self._load(model, tensors)

    def _is_adapter(self, name: str) -> bool:
        return any(f".{t}." in f".{name}" for t in self.per_module + self.shared_names())

    def shared_names(self) -> tuple[str, ...]:
        return ()

    def _load(self, model, tensors: dict[str, torch.Tensor]) -> None:
        layers = self.layers(model)
        want = {f"{n}.{t}" for n in layers for t in self.per_module}
        missing = sorted(want - set(tensors))
        if missing:
            raise PatchFormatError(f"{self.method} patch is missing tensor {missing[0]}")
        with torch.no_grad():
            for n, m in layers.items():
                for t in self.per_module:
                    dst, src = getattr(m, t)[ADAPTER], tensors[f"{n}.{t}"]
                    if tuple(dst.shape) != tuple(src.shape):
                        raise PatchFormatError(f"{self.method} tensor {n}.{t} has shape {tuple(src.shape)} but this "
                                               f"model needs {tuple(dst.shape)}: patch made for another architecture")
                    dst.copy_(src)
            self.load_shared(model, tensors)

    # -- PatchKind
    def detach(self, model):
        for name in list(self.layers(model)):
            parent, child = get_parent(model, name)
            setattr(parent, child, getattr(parent, child).get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config

    def state(self, model):
        out = {}
        for n, m in self.layers(model).items():
            for t in self.per_module:
                out[f"{n}.{t}"] = getattr(m, t)[ADAPTER].detach().to("cpu", torch.float32, copy=True).contiguous()
        out.update(self.shared_state(model))
        return out

    def trainable_parameters(self, model):
        return [p for n, p in model.named_parameters() if self._is_adapter(n)]

    @staticmethod
    def module_names(tensors: dict[str, torch.Tensor], suffix: str) -> list[str]:
        return sorted({k[: -len(suffix) - 1] for k in tensors if k.endswith("." + suffix)})

    def targets(self, model, cfg, tensors) -> list[str]:
        if tensors is not None:
            return self.module_names(tensors, self.per_module[0])
        return resolve_targets(model, cfg.targets)
