"""Export a quantized dense model in the GPTQ checkpoint layout that transformers loads through gptqmodel, and
read it back (read_gptq: a reference reader of the layout, used by the tests and the benchmark).

Per quantized Linear `M`: `M.qweight` int32 [in * bits / 32, out] (each output column's codes along the input
dimension as one little-endian bit stream, code k at bit bits*k: 8 int4 per int32, 32 int3 in three int32),
`M.qzeros` int32 [groups, out * bits / 32] (the zero codes along the output dimension; the v1 format "gptq" stores
zero - 1, v2 "gptq_v2" the zero itself), `M.scales` float16 [groups, out], `M.g_idx` int32 [in] (each input
column's group). Everything else is float16. config.json gets a quantization_config (quant_method gptq, the
bits and group size of most parameters, sym false, desc_act = act-order) with gptqmodel's `dynamic` map for the
modules whose bits or group size differ ("+:^name$") or that stay in 16 bits ("-:^name$"). vLLM reads the same v1
layout and takes per-module bits through the same `dynamic` field of the GPTQ config. The fused experts of a
transformers-5 MoE have no per-expert Linear in this layout, so MoE export is refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from patchlm.errors import ConfigError, PatchFormatError
from patchlm.paths import atomic_dir
from patchlm.quant.config import KEEP
from patchlm.quant.gptq import dequantize
from patchlm.quant.kind import QuantMatrix
from patchlm.quant.packing import pack, unpack
from patchlm.quant.units import model_units

MOE_EXPORT = ("GPTQ export of fused MoE experts is not supported (the layout has no per-expert Linear of "
              "transformers 5's fused experts); run the MoE as a quant patch instead")


def _words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, n] (n * bits a multiple of 32) -> int32 [rows, n * bits / 32], each row one bit stream."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise ConfigError(f"the GPTQ layout packs {bits}-bit codes into int32 words: {n} codes per row do not fill "
                          "whole words", field="group_size")
    return pack(codes, bits).view(rows, n * bits // 8).contiguous().view(torch.int32)


def _codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = words.shape[0]
    return unpack(words.contiguous().view(torch.uint8).reshape(-1), bits, rows * n).view(rows, n)


def gptq_tensors(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, g_idx: torch.Tensor | None, v1: bool = True) -> dict[str, torch.Tensor]:
    """The GPTQ layout of one quantized matrix (codes [out, in], scales / zeros [out, groups])."""
    in_f = codes.shape[1]
    gidx = (torch.arange(in_f) // (group_size or in_f)).to(torch.int32) if g_idx is None else g_idx.to(torch.int32)
    z = zeros.long().T.contiguous()                      # [groups, out]
    if v1:
        z = (z - 1) & ((1 << bits) - 1)
    return {f"{name}.qweight": _words(codes.contiguous(), bits).T.contiguous(),
            f"{name}.qzeros": _words(z, bits), f"{name}.scales": scales.T.contiguous().half(),
            f"{name}.g_idx": gidx}


def export_gptq(base, spec: dict, tensors: dict[str, torch.Tensor], out: str | Path, force: bool = False) -> Path:
    """Write `out`: config.json with the quantization_config, model.safetensors in the GPTQ layout, tokenizer.

    `base.model` must be the quantized model (its other weights are written as they are, in float16)."""
    from safetensors.torch import save_file

    units = spec["units"]
    if any(u.get("expert") is not None for u in units.values()):
        raise ConfigError(MOE_EXPORT)
    quant = {n: u for n, u in units.items() if u["bits"] != KEEP}
    if not quant:
        raise ConfigError("nothing is quantized: no GPTQ checkpoint to export", field="plan")
    mats = {n: QuantMatrix(tuple(u["shape"]), u["bits"], u["group_size"], tensors[f"{n}.qweight"],
                           tensors[f"{n}.scales"], tensors[f"{n}.qzeros"], tensors.get(f"{n}.g_idx")) for n, u in
            quant.items()}
    v1 = all(int(m.zeros().min()) >= 1 for m in mats.values())  # v1 stores zero - 1: a zero code of 0 needs v2
    out_t: dict[str, torch.Tensor] = {}
    for n, m in mats.items():
        out_t.update(gptq_tensors(n, m.codes(), m.scales, m.zeros(), m.bits, m.group_size, m.g_idx, v1=v1))
        if f"{n}.bias" in tensors:
            out_t[f"{n}.bias"] = tensors[f"{n}.bias"].half()
    model = base.model
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        if any(k.startswith(n + ".") for n in quant):
            continue
        out_t[k] = v.detach().half().contiguous() if v.is_floating_point() else v.detach().contiguous()
    weight = Counter()
    for u in quant.values():  # the base bits and group: those of most parameters
        weight[(u["bits"], u["group_size"])] += u["shape"][0] * u["shape"][1]
    common = weight.most_common(1)[0][0]
    dynamic = {}
    kept = {u.name for u in model_units(model)} | {n for n, u in units.items() if u["bits"] == KEEP}
    for n in sorted(kept):  # Linear modules still in full precision (the quantized ones are QuantLinear now)
        dynamic[f"-:^{re.escape(n)}$"] = {}
    for n, u in units.items():
        if u["bits"] == KEEP:
            continue
        if (u["bits"], u["group_size"]) != common:
            dynamic[f"+:^{re.escape(n)}$"] = {"bits": u["bits"], "group_size": u["group_size"] or -1}
    qcfg = {"quant_method": "gptq", "bits": common[0], "group_size": common[1] or -1, "desc_act":
            bool(spec.get("act_order")), "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2",
            "format": "gptq" if v1 else "gptq_v2", "damp_percent": 0.01, "true_sequential": False,
            "meta": {"quantizer": ["patchlm"]}, **({"dynamic": dynamic} if dynamic else {})}
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = "float16"
    cfg.pop("torch_dtype", None)
    with atomic_dir(out, force=force) as tmp:
        save_file(out_t, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        base.tokenizer.save_pretrained(tmp)
    return Path(out)


@torch.no_grad()
def read_gptq(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a GPTQ-layout checkpoint into a plain transformers model by dequantizing every packed Linear (a
    reference reader of the layout, v1 and v2, per-module bits through `dynamic`)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    q = raw.get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        raise PatchFormatError(f"{path} is not a GPTQ checkpoint (no gptq quantization_config)")
    v1 = q.get("checkpoint_format", q.get("format", "gptq")) == "gptq"
    dynamic = q.get("dynamic") or {}
    cfg_d = {k: v for k, v in raw.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(**cfg_d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    st = load_file(str(path / "model.safetensors"))
    state = {}
    for k in [k for k in st if k.endswith(".qweight")]:
        n = k[: -len(".qweight")]
        bits, gs = int(q["bits"]), int(q["group_size"])
        for pat, over in dynamic.items():
            if pat.startswith("+:") and re.search(pat[2:], n):
                bits, gs = int(over.get("bits", bits)), int(over.get("group_size", gs))
        qw, qz, sc, gi = st[k], st[f"{n}.qzeros"], st[f"{n}.scales"], st[f"{n}.g_idx"]
        in_f, out_f = qw.shape[0] * 32 // bits, qw.shape[1]
        codes = _codes(qw.T.contiguous(), bits, in_f)                    # [out, in]
        z = _codes(qz, bits, out_f).long()                               # [groups, out]
        if v1:
            z = z + 1  # v1 stores zero - 1
        state[f"{n}.weight"] = dequantize(codes, sc.T.float(), z.T.float(), 0, gi.long()).to(dtype)
        if f"{n}.bias" in st:
            state[f"{n}.bias"] = st[f"{n}.bias"].to(dtype)
    for k, v in st.items():
        if k.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx"):
            state[k] = v.to(dtype) if v.is_floating_point() else v
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise PatchFormatError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
