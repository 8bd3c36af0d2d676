"""VeRA (Kopiczko et al., 2024), PEFT-backed: y = W x + diag(b) B diag(d) A x.

A (r x d_in) and B (d_out x r) are frozen random projections shared by every module, sliced to each module's
size; only the vectors d (r) and b (d_out) train. The projections regenerate from the seed (PEFT's
`projection_prng_key`) and the module shapes recorded in the spec, so the patch stores just the vectors:
`<module>.vera_lambda_d`, `<module>.vera_lambda_b`. Materialized, it is an exact rank-r LoRA:
A' = diag(d) A, B' = diag(b) B, scaling 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from patchlm.adapters.config import check_dropout, check_positive_int, from_spec, to_spec
from patchlm.adapters.lora import TARGETS_HELP
from patchlm.adapters.peft_tuner import PeftTunerKind
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import Patch, provenance, register_kind
from patchlm.typed import check_fields


@dataclass
class VeraConfig:
    """VeRA hyper-parameters: a VeRA patch's spec, the `patchlm train --method vera` options, a recipe's spec."""

    r: int = field(default=256, metadata={"help": "VeRA: rank of the shared frozen random projections"})
    d_initial: float = field(default=0.1, metadata={"help": "VeRA: initial value of the trainable vector d"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: str | list[str] = field(default="all-linear", metadata={"help": TARGETS_HELP})
    module_shapes: dict[str, list[int]] | None = field(default=None, metadata={
        "cli": False, "help": "module -> [d_out, d_in]: filled in when the patch is made (the projections' size)"})

    def __post_init__(self):
        check_fields(self)
        check_positive_int(self.r, "r", "VeRA rank")
        check_dropout(self.dropout, "VeRA")
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ConfigError(f"VeRA d_initial must be a number, got {self.d_initial!r}", field="d_initial")


def projections(r: int, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen A (r x d_in) and B (d_out x r), drawn exactly as PEFT draws them from the seed."""
    from peft.tuners.vera.model import _kaiming_init

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out_dim, in_dim = shape
    a = _kaiming_init((int(r), int(in_dim)), generator=gen)
    b = _kaiming_init((int(out_dim), int(r)), generator=gen)
    return a, b


@register_kind("vera", stage="weight", capabilities=("materialize", "export-peft", "export-merged"))
class VeraKind(PeftTunerKind):
    """spec: VeraConfig's fields (targets resolved, projection_shape recorded) and the seed of the projections."""

    per_module = ("vera_lambda_b", "vera_lambda_d")
    method = "VeRA"

    @staticmethod
    def layer_cls():
        from peft.tuners.vera.layer import VeraLayer

        return VeraLayer

    def peft_config(self, cfg, names, seed):
        from peft import VeraConfig as PeftVeraConfig

        with warnings.catch_warnings():  # not saving the projections is the design: they regenerate from the seed
            warnings.filterwarnings("ignore", message="Specified to not save vera_A")
            return PeftVeraConfig(r=int(cfg.r), d_initial=float(cfg.d_initial), vera_dropout=float(cfg.dropout),
                                  target_modules=list(names), save_projection=False, projection_prng_key=int(seed))

    def attach(self, model, spec, tensors=None, seed=0):
        spec = dict(spec)
        cfg = from_spec(VeraConfig, spec, "vera", strict=tensors is None)
        seed = int(spec.get("seed", seed)) if tensors is not None else int(seed)
        names = self.targets(model, cfg, tensors)
        shapes = {n: [model.get_submodule(n).out_features, model.get_submodule(n).in_features] for n in names}
        if cfg.module_shapes is not None and {k: list(v) for k, v in cfg.module_shapes.items()} != shapes:
            raise PatchFormatError("VeRA patch was made for modules of other shapes: patch made for another "
                                   "architecture")
        self.inject(model, cfg, names, seed, tensors)
        return {**spec, **to_spec(cfg, targets=names, module_shapes=shapes), "seed": seed}

    def summary(self, spec, tensors):
        return {"rank": spec.get("r"), "num_modules": len(self.module_names(tensors, "vera_lambda_b"))}

    def materialize(self, patch: Patch) -> Patch:
        """The equivalent LoRA patch: A' = diag(d) A[:, :d_in], B' = diag(b) B[:d_out], scaling 1 (exact)."""
        cfg = from_spec(VeraConfig, patch.spec, "vera", strict=False)
        shapes = cfg.module_shapes or {}
        names = self.module_names(patch.tensors, "vera_lambda_b")
        if not names or any(n not in shapes for n in names):
            raise PatchFormatError("VeRA patch spec lacks the module shapes: cannot rebuild its projections")
        # PEFT sizes the shared projections by the largest input and output over the targeted modules
        shape = (max(int(shapes[n][0]) for n in names), max(int(shapes[n][1]) for n in names))
        a_full, b_full = projections(cfg.r, shape, int(patch.spec.get("seed", 0)))
        tensors = {}
        for n in names:
            lam_b, lam_d = patch.tensors[f"{n}.vera_lambda_b"].float(), patch.tensors.get(f"{n}.vera_lambda_d")
            if lam_d is None:
                raise PatchFormatError(f"VeRA patch is missing tensor {n}.vera_lambda_d")
            d_out, d_in = (int(x) for x in shapes[n])
            tensors[f"{n}.lora_A"] = (lam_d.float()[:, None] * a_full[:, :d_in]).contiguous()
            tensors[f"{n}.lora_B"] = (lam_b[:, None] * b_full[:d_out]).contiguous()
        spec = {"r": int(cfg.r), "alpha": float(cfg.r), "scaling": 1.0, "dropout": float(cfg.dropout),
                "targets": sorted({k.rsplit(".", 1)[0] for k in tensors})}
        return Patch(kind="lora", base=dict(patch.base), spec=spec, tensors=tensors,
                     provenance=provenance(materialized_from="vera", source=str(patch.path) if patch.path else None,
                                           vera_spec=dict(patch.spec)),
                     metrics=dict(patch.metrics))

