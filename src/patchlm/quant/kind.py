"""The `quant` patch kind: packed integer weights, float16 scales and packed zero codes, run on CPU by a
dequantize-on-the-fly linear.

Each quantized unit U (a Linear module, or one expert's slice `<experts>.<e>.gate_up_proj` / `.down_proj` of a
fused transformers-5 MoE experts module) is stored as `U.qweight` (its [out, in] codes packed at its bits, row-major),
`U.scales` (float16 [out, groups]), `U.qzeros` (the zero codes packed at its bits) and, with act-order, `U.g_idx`
(int32 [in]); a Linear's bias as `U.bias`; a unit kept at 16 bits whose weight differs from the base (a LoRA baked
in before quantization) as `U.weight` (bfloat16). spec["units"] gives each unit's bits, group size and shape.
So the patch file is the quantized size. Attaching replaces the modules; the original weights are dropped (that is
the memory saving), so a quant patch cannot be detached: reload the base instead.

How the units run (spec["kernel"], `QuantConfig.kernel`; `set_kernel` switches a loaded model): `dequant` unpacks
and dequantizes each weight to float32 at every call; `auto` moves the 4-bit units that torch's packed int4 CPU
matmul accepts (group 32/64/128/256, a multiple of 16 output rows, no act-order) into that kernel's own layout and
runs them in bfloat16 (activations and scales rounded to bfloat16: logits move by about bfloat16's resolution
against `dequant`), the rest as `dequant`. Either way a weight is held once, packed; the codes are recovered exactly
from the kernel's layout when the patch is saved again.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from patchlm.errors import PatchFormatError, PatchlmError
from patchlm.models.parts import is_fused_experts
from patchlm.patch import PatchKind, register_kind
from patchlm.quant.config import KEEP, KERNELS
from patchlm.quant.gptq import Quantized, dequantize
from patchlm.quant.packing import pack, packed_nbytes, unpack

EXPERT_PARTS = ("gate_up_proj", "down_proj")


class QuantMatrix(nn.Module):
    """One packed weight matrix [out, in]; weight() dequantizes it (float32) each time it is asked."""

    def __init__(self, shape: tuple[int, int], bits: int, group_size: int, qweight: torch.Tensor,
                 scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None = None):
        super().__init__()
        self.shape, self.bits, self.group_size = (int(shape[0]), int(shape[1])), int(bits), int(group_size)
        out, cols = self.shape
        ng = 1 if not group_size else cols // group_size
        if qweight.numel() != packed_nbytes(out * cols, bits) or tuple(scales.shape) != (out, ng) or \
                qzeros.numel() != packed_nbytes(out * ng, bits):
            raise PatchFormatError(f"packed tensors do not fit a {bits}-bit [{out}, {cols}] matrix with group size "
                                   f"{group_size}")
        if g_idx is not None and (g_idx.numel() != cols or int(g_idx.min()) < 0 or int(g_idx.max()) >= ng):
            raise PatchFormatError(f"g_idx does not fit a matrix with {cols} input columns and {ng} groups")
        self.register_buffer("qweight", qweight.to(torch.uint8).reshape(-1), persistent=False)
        self.register_buffer("scales", scales.to(torch.float16), persistent=False)
        self.register_buffer("qzeros", qzeros.to(torch.uint8).reshape(-1), persistent=False)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32), persistent=False)

    @classmethod
    def from_quantized(cls, q: Quantized) -> QuantMatrix:
        return cls(tuple(q.codes.shape), q.bits, q.group_size, pack(q.codes, q.bits), q.scales,
                   pack(q.zeros, q.bits), q.g_idx)

    def codes(self) -> torch.Tensor:
        out, cols = self.shape
        return unpack(self.qweight, self.bits, out * cols).view(out, cols)

    def zeros(self) -> torch.Tensor:
        return unpack(self.qzeros, self.bits, self.scales.numel()).view(self.scales.shape)

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros(), self.group_size, self.g_idx)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T, W dequantized now (float32, then x's dtype)."""
        return F.linear(x, self.weight().to(x.dtype))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales, f"{prefix}.qzeros": self.qzeros}
        if self.g_idx is not None:
            out[f"{prefix}.g_idx"] = self.g_idx
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors("x").values())


INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 CPU matmul takes


def int4pack_refusal(m: nn.Module) -> str | None:
    """Why torch's packed int4 CPU matmul cannot run matrix `m` (None: it can)."""
    if not isinstance(m, QuantMatrix) or m.bits != 4:
        return "not a 4-bit matrix"
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no packed int4 CPU matmul"
    if m.group_size not in INT4_GROUPS:
        return f"group size {m.group_size} (the kernel takes {', '.join(map(str, INT4_GROUPS))})"
    if m.shape[0] % 16:
        return f"{m.shape[0]} output rows (the kernel needs a multiple of 16)"
    if m.g_idx is not None and not torch.equal(m.g_idx.long(), torch.arange(m.shape[1]) // m.group_size):
        return "act-order groups (g_idx is not contiguous)"
    return None


@functools.lru_cache(maxsize=64)
def _int4pack_order(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of torch's int4 CPU layout of a [rows, cols] matrix (byte by byte, low nibble first), the
    row-major index of the code it holds: the layout is a permutation of the codes, read off by converting one
    probe matrix per four bits of the index, whose codes are those four bits of their own index (checked to be a
    permutation)."""
    n = rows * cols
    idx = torch.arange(n, dtype=torch.int64)
    order = torch.zeros(n, dtype=torch.int64)
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        probe = ((idx >> shift) & 15).to(torch.int32).view(rows, cols)
        b = torch._convert_weight_to_int4pack_for_cpu(probe, 1).to(torch.int64).reshape(-1)
        order |= torch.stack([b & 15, b >> 4], dim=1).reshape(-1) << shift
    if not torch.equal(torch.sort(order).values, idx):
        raise PatchFormatError("torch's int4 CPU layout is not a permutation of the codes here; use kernel dequant")
    return order


class Int4PackMatrix(nn.Module):
    """A 4-bit matrix in torch's packed int4 CPU layout, multiplied by `torch._weight_int4pack_mm_for_cpu` in
    bfloat16 (w = (q - 8) * scale + offset per group, offset = (8 - zero) * scale). Keeps the float16 scales and the
    packed zeros, so the stored tensors (`tensors`) are the same bytes as the QuantMatrix it came from."""

    def __init__(self, m: QuantMatrix):
        super().__init__()
        why = int4pack_refusal(m)
        if why is not None:
            raise ValueError(f"torch's int4 matmul cannot run this matrix: {why}")
        self.shape, self.bits, self.group_size = m.shape, 4, m.group_size
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(m.codes().to(torch.int32), 1),
                             persistent=False)
        s, z = m.scales.float(), m.zeros().float()  # [out, groups]
        sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16), persistent=False)
        self.register_buffer("scales", m.scales, persistent=False)
        self.register_buffer("qzeros", m.qzeros, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out, cols = self.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, cols).to(torch.bfloat16).contiguous(), self.packed,
                                              self.group_size, self.scales_zeros)
        return y.view(*x.shape[:-1], out).to(x.dtype)

    def codes(self) -> torch.Tensor:
        out, cols = self.shape
        b = self.packed.reshape(-1)
        nib = torch.stack([b & 15, b >> 4], dim=1).reshape(-1)
        codes = torch.empty(out * cols, dtype=torch.uint8)
        codes[_int4pack_order(out, cols)] = nib
        return codes.view(out, cols)

    def zeros(self) -> torch.Tensor:
        return unpack(self.qzeros, 4, self.scales.numel()).view(self.scales.shape)

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros(), self.group_size)

    def to_quant_matrix(self) -> QuantMatrix:
        return QuantMatrix(self.shape, 4, self.group_size, pack(self.codes(), 4), self.scales, self.qzeros)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": pack(self.codes(), 4), f"{prefix}.scales": self.scales,
                f"{prefix}.qzeros": self.qzeros}


class DenseMatrix(nn.Module):
    """A unit kept at 16 bits inside a quantized module (bfloat16 as stored; a base slice keeps its dtype)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.register_buffer("w", weight.detach().to(dtype or weight.dtype).clone().contiguous(), persistent=False)
        self.shape, self.bits = tuple(weight.shape), KEEP

    def weight(self) -> torch.Tensor:
        return self.w.float()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.to(x.dtype))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": self.w}


class QuantLinear(nn.Module):
    """y = x W^T + b with W packed: dequantized at every call, or run by torch's int4 kernel (no float copy is
    kept)."""

    def __init__(self, matrix: nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        self.matrix = matrix
        self.out_features, self.in_features = matrix.shape
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(nn.Module):
    """A fused MoE experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with each expert's slices
    quantized; forward dequantizes only the experts the tokens were routed to (Mixtral's eager loop)."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            gate, up = self.gate_up[e].matmul(x).chunk(2, dim=-1)
            y = self.down[e].matmul(self.act_fn(gate) * up)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, child = name.rpartition(".")
    return (model.get_submodule(head) if head else model), child


def _unit_module(unit: str, info: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    bits = int(info["bits"])
    if bits == KEEP:
        w = tensors.get(f"{unit}.weight")
        if w is None:
            raise PatchFormatError(f"quant patch keeps unit {unit} at 16 bits but has no {unit}.weight")
        return DenseMatrix(w)
    need = [f"{unit}.{k}" for k in ("qweight", "scales", "qzeros")]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise PatchFormatError(f"quant patch is missing {', '.join(missing)}")
    return QuantMatrix(tuple(info["shape"]), bits, int(info["group_size"]), *(tensors[k] for k in need),
                       tensors.get(f"{unit}.g_idx"))


def install(model: nn.Module, units: dict[str, dict], tensors: dict[str, torch.Tensor],
            kernel: str = "dequant") -> None:
    """Replace the model's Linear and fused-experts modules by their quantized forms (units: spec["units"]), run
    by `kernel` (see the module docstring)."""
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for unit, info in units.items():
        if info.get("expert") is not None:
            parent, e, part = info["experts_module"], int(info["expert"]), unit.rsplit(".", 1)[1]
            experts.setdefault(parent, {}).setdefault(e, {})[part] = unit
            continue
        try:
            mod = model.get_submodule(unit)
        except AttributeError:
            raise PatchFormatError(f"quant patch targets a module this model does not have: {unit}") from None
        if not isinstance(mod, nn.Linear):
            raise PatchFormatError(f"quant patch unit {unit} is a {type(mod).__name__}, not a Linear")
        m = _unit_module(unit, info, tensors)
        if tuple(m.shape) != tuple(mod.weight.shape):
            raise PatchFormatError(f"quant unit {unit} has shape {list(m.shape)}, the model's module "
                                   f"{list(mod.weight.shape)}")
        bias = tensors.get(f"{unit}.bias", mod.bias)
        parent, child = _parent(model, unit)
        setattr(parent, child, QuantLinear(m, bias) if isinstance(m, QuantMatrix) else _dense_linear(m, bias))
    for name, per in experts.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise PatchFormatError(f"quant patch targets experts this model does not have: {name}") from None
        if not is_fused_experts(mod):
            raise PatchFormatError(f"quant patch unit {name} is a {type(mod).__name__}, not a fused experts module")
        n = mod.gate_up_proj.shape[0]
        parts = {p: [] for p in EXPERT_PARTS}
        for e in range(n):
            for p in EXPERT_PARTS:
                unit = per.get(e, {}).get(p)
                parts[p].append(_unit_module(unit, units[unit], tensors) if unit else
                                DenseMatrix(getattr(mod, p)[e], dtype=None))
        parent, child = _parent(model, name)
        setattr(parent, child, QuantExperts(parts["gate_up_proj"], parts["down_proj"], mod.act_fn))
    if kernel != "dequant":
        set_kernel(model, kernel)


def set_kernel(model: nn.Module, kernel: str) -> dict[str, int]:
    """Run the model's quantized units by `kernel` ("auto" | "dequant", see the module docstring), converting the
    matrices in place (exactly: the codes are the same); returns how many matrices each kernel runs."""
    if kernel not in KERNELS:
        raise PatchlmError(f"unknown kernel {kernel!r}; choices: {', '.join(KERNELS)}")

    def convert(m: nn.Module) -> nn.Module:
        if kernel == "dequant" and isinstance(m, Int4PackMatrix):
            return m.to_quant_matrix()
        if kernel == "auto" and isinstance(m, QuantMatrix) and int4pack_refusal(m) is None:
            return Int4PackMatrix(m)
        return m

    counts = {"int4pack": 0, "dequant": 0}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.matrix = convert(mod.matrix)
            mats = [mod.matrix]
        elif isinstance(mod, QuantExperts):
            for lst in (mod.gate_up, mod.down):
                for i in range(len(lst)):
                    lst[i] = convert(lst[i])
            mats = [*mod.gate_up, *mod.down]
        else:
            continue
        for m in mats:
            if isinstance(m, Int4PackMatrix):
                counts["int4pack"] += 1
            elif isinstance(m, QuantMatrix):
                counts["dequant"] += 1
    return counts


def _dense_linear(m: DenseMatrix, bias) -> nn.Linear:
    lin = nn.Linear(m.shape[1], m.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(m.weight())
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


def is_quantized(model: nn.Module) -> bool:
    """Whether the model already holds quantized modules (ours) or was loaded from a quantized checkpoint."""
    if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        return True
    return getattr(getattr(model, "config", None), "quantization_config", None) is not None


@register_kind("quant", stage="weight")
class QuantKind(PatchKind):
    """Packed low-bit weights (see the module docstring). spec: method, plan, avg_bits, units, report."""

    def attach(self, model, spec, tensors=None, seed=0):
        if tensors is None:
            raise PatchFormatError("a quant patch is made by `patchlm quant`, not trained: it needs its tensors")
        units = spec.get("units")
        if not isinstance(units, dict) or not units:
            raise PatchFormatError("quant patch spec has no units")
        if is_quantized(model):
            raise PatchFormatError("this model is already quantized: a second quant patch cannot be stacked")
        install(model, units, tensors, kernel=spec.get("kernel", "dequant"))
        return dict(spec)

    def detach(self, model):
        raise PatchlmError("a quant patch replaced the base weights by their quantized form (the originals are not "
                           "kept: that is the memory saving); reload the base to remove it")

    def state(self, model):
        out: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                out.update(m.matrix.tensors(name))
                if m.bias is not None:
                    out[f"{name}.bias"] = m.bias
            elif isinstance(m, QuantExperts):
                for e in range(m.num_experts):
                    out.update(m.gate_up[e].tensors(f"{name}.{e}.gate_up_proj"))
                    out.update(m.down[e].tensors(f"{name}.{e}.down_proj"))
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def count_trainable(self, spec, tensors):
        return 0

    def summary(self, spec, tensors):
        return {"avg_bits": spec.get("avg_bits"), "method": spec.get("method"), "num_units": len(spec.get("units", {})),
                "packed_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
