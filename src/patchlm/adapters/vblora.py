"""VB-LoRA (Li et al., 2024), PEFT-backed: every vector_length-long piece of A and B is a top-k mixture of one
shared vector bank.

For each piece, logits over the bank's `num_vectors` vectors keep their top k, softmax-weighted:
piece = sum_j softmax(top-k logits)_j bank[index_j]. A is r x d_in (d_in / vector_length pieces per row), B is
d_out x r; y = W x + B A x. The patch stores `<module>.vblora_logits_A` [r, d_in/len, n],
`<module>.vblora_logits_B` [d_out/len, r, n] and the bank `vblora.vector_bank` [n, len]. Materialized, it is
the exact rank-r LoRA with those A and B (scaling 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from patchlm.adapters.config import check_dropout, check_positive_int, from_spec, to_spec
from patchlm.adapters.lora import TARGETS_HELP
from patchlm.adapters.peft_tuner import ADAPTER, PeftTunerKind
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import Patch, provenance, register_kind
from patchlm.typed import check_fields

BANK = "vblora.vector_bank"


@dataclass
class VBLoraConfig:
    """VB-LoRA hyper-parameters: a VB-LoRA patch's spec, the `patchlm train --method vblora` options, a recipe's
    spec. The defaults train LoRA r=2's count + 2,048 on a Llama-style model (the adapters study's budget)."""

    r: int = field(default=4, metadata={"help": "VB-LoRA: rank of A and B"})
    vector_length: int = field(default=64, metadata={
        "help": "VB-LoRA: length of the bank's vectors (must divide every targeted module's sizes)"})
    num_vectors: int = field(default=32, metadata={"help": "VB-LoRA: vectors in the shared bank"})
    topk: int = field(default=2, metadata={"help": "VB-LoRA: bank vectors mixed into each piece"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: str | list[str] = field(default="all-linear", metadata={"help": TARGETS_HELP})

    def __post_init__(self):
        check_fields(self)
        for name in ("r", "vector_length", "num_vectors", "topk"):
            check_positive_int(getattr(self, name), name, "VB-LoRA")
        if self.topk > self.num_vectors:
            raise ConfigError(f"VB-LoRA topk={self.topk} exceeds num_vectors={self.num_vectors}", field="topk")
        check_dropout(self.dropout, "VB-LoRA")


def mixture(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Each row of logits [..., n] -> the softmax-weighted sum of its top-k bank vectors [..., len]."""
    top, idx = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


def lora_matrices(logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor, topk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x d_in) and B (d_out x r) of one module, as PEFT's VB-LoRA layer builds them."""
    a = mixture(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = mixture(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


@register_kind("vblora", stage="weight", capabilities=("materialize", "export-peft", "export-merged"))
class VBLoraKind(PeftTunerKind):
    """spec: VBLoraConfig's fields (targets resolved) and the init seed."""

    per_module = ("vblora_logits_A", "vblora_logits_B")
    method = "VB-LoRA"

    @staticmethod
    def layer_cls():
        from peft.tuners.vblora.layer import VBLoRALayer

        return VBLoRALayer

    def shared_names(self):
        return ("vblora_vector_bank",)

    def peft_config(self, cfg, names, seed):
        from peft import VBLoRAConfig

        return VBLoRAConfig(r=int(cfg.r), vector_length=int(cfg.vector_length), num_vectors=int(cfg.num_vectors),
                            topk=int(cfg.topk), vblora_dropout=float(cfg.dropout), target_modules=list(names))

    def attach(self, model, spec, tensors=None, seed=0):
        spec = dict(spec)
        cfg = from_spec(VBLoraConfig, spec, "vblora", strict=tensors is None)
        names = self.targets(model, cfg, tensors)
        for n in names:
            m = model.get_submodule(n)
            for what, d in (("input", getattr(m, "in_features", 0)), ("output", getattr(m, "out_features", 0))):
                if d % int(cfg.vector_length):
                    raise ConfigError(f"VB-LoRA vector_length={cfg.vector_length} does not divide the {what} size "
                                      f"{d} of {n}; choose a divisor of every targeted module's sizes",
                                      field="vector_length")
        if tensors is not None and BANK not in tensors:
            raise PatchFormatError(f"VB-LoRA patch is missing tensor {BANK}")
        self.inject(model, cfg, names, int(seed), tensors)
        return {**spec, **to_spec(cfg, targets=names)}

    def _bank(self, model) -> torch.nn.Parameter:
        return next(iter(self.layers(model).values())).vblora_vector_bank[ADAPTER]

    def shared_state(self, model):
        return {BANK: self._bank(model).detach().to("cpu", torch.float32, copy=True).contiguous()}

    def load_shared(self, model, tensors):
        bank = self._bank(model)
        if tuple(bank.shape) != tuple(tensors[BANK].shape):
            raise PatchFormatError(f"VB-LoRA bank has shape {tuple(tensors[BANK].shape)} but the spec needs "
                                   f"{tuple(bank.shape)}")
        bank.copy_(tensors[BANK])

    def summary(self, spec, tensors):
        return {"rank": spec.get("r"), "num_vectors": spec.get("num_vectors"),
                "vector_length": spec.get("vector_length"), "topk": spec.get("topk"),
                "num_modules": len(self.module_names(tensors, "vblora_logits_A"))}

    def materialize(self, patch: Patch) -> Patch:
        """The equivalent LoRA patch: each module's A and B built from the bank, scaling 1 (exact)."""
        cfg = from_spec(VBLoraConfig, patch.spec, "vblora", strict=False)
        if BANK not in patch.tensors:
            raise PatchFormatError(f"VB-LoRA patch is missing tensor {BANK}")
        bank = patch.tensors[BANK].float()
        tensors = {}
        for n in self.module_names(patch.tensors, "vblora_logits_A"):
            la, lb = patch.tensors[f"{n}.vblora_logits_A"], patch.tensors.get(f"{n}.vblora_logits_B")
            if lb is None:
                raise PatchFormatError(f"VB-LoRA patch is missing tensor {n}.vblora_logits_B")
            a, b = lora_matrices(la.float(), lb.float(), bank, int(cfg.topk))
            tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = a.contiguous(), b.contiguous()
        spec = {"r": int(cfg.r), "alpha": float(cfg.r), "scaling": 1.0, "dropout": float(cfg.dropout),
                "targets": sorted({k.rsplit(".", 1)[0] for k in tensors})}
        return Patch(kind="lora", base=dict(patch.base), spec=spec, tensors=tensors,
                     provenance=provenance(materialized_from="vblora",
                                           source=str(patch.path) if patch.path else None,
                                           vblora_spec=dict(patch.spec)),
                     metrics=dict(patch.metrics))
