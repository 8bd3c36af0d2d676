"""Command: `patchlm quant`: GPTQ / RTN post-training quantization with uniform bits or a bit plan, written as a
`quant` patch (packed integers, scales, zeros) that `patchlm eval --patch` runs; `--export` also writes the GPTQ
checkpoint layout (qweight/qzeros/scales/g_idx) that transformers reads through gptqmodel.

Its options are generated from QuantConfig (patchlm.quant.config): every default and help text lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import load_patches, print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.errors import ConfigError
from patchlm.quant.config import QuantConfig


def bake_patches(base, patches, paths) -> set[str]:
    """Apply weight patches (LoRA, or any kind with a LoRA form) and merge them into the weights for good, then
    depth patches as they are; return the names of the Linear modules whose weights changed."""
    import torch

    from patchlm.adapters.lora import bake_lora
    from patchlm.adapters.peft_io import to_lora_patch
    from patchlm.patch import get_kind, kind_can, stack_order

    for path, p in zip(paths, patches):
        if p.kind == "quant":
            raise ConfigError(f"patch {path} is already a quant patch: quantize the full-precision model (give "
                              "its LoRA / MoS / drop patches, not a quant patch)")
        if get_kind(p.kind).stage == "weight" and p.kind != "lora" and not kind_can(p.kind, "materialize"):
            raise ConfigError(f"a {p.kind} patch ({path}) cannot be baked into the weights before quantizing (it has "
                              "no LoRA form); give it to `patchlm eval` beside the quant patch instead")
    before = {n: m.weight.detach().clone() for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    weight = [p for p in stack_order(patches) if get_kind(p.kind).stage == "weight"]
    for p in weight:
        to_lora_patch(p).apply(base)
    bake_lora(base.model)
    for p in stack_order(patches):
        if get_kind(p.kind).stage != "weight":
            p.apply(base)
    changed = set()
    for n, m in base.model.named_modules():
        if isinstance(m, torch.nn.Linear) and n in before and not torch.equal(before[n], m.weight.detach()):
            changed.add(n)
    return changed


@config_command(Group(QuantConfig, panel="Quantization (QuantConfig)"))
def quant(cv: ConfigValues,
          model: Annotated[str, typer.Option("--model", "-m", help="built-in name, checkpoint dir or .gguf")],
          out: Annotated[Path, typer.Option("--out", "-o", help="the quant patch directory to write")],
          patch: Annotated[list[Path] | None, typer.Option(
              "--patch", "-p", help="patch to apply first (repeat): LoRA-like patches are baked into the weights "
                                    "before quantizing; depth patches (drop) shape the calibration and must be "
                                    "given again at eval")] = None,
          export: Annotated[Path | None, typer.Option(
              "--export", help="also write the GPTQ checkpoint layout (gptqmodel / transformers) here")] = None,
          force: Annotated[bool, typer.Option("--force", help="overwrite OUT (and --export)")] = False,
          json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Quantize a model (after its patches) with GPTQ or RTN and write a `quant` patch.

    Example: `patchlm quant --model tiny-random-llama --bits 4 --group-size 32 --calib-samples 8 --out runs/q4`,
    then `patchlm eval --model tiny-random-llama --patch runs/q4 --task news_corpus --limit 20`. Plans:
    `--plan 'all=2;attn=4;first:1=8'` or `--plan heuristic:outlier@2.5`.
    """
    from patchlm.models import load_base
    from patchlm.patch import Patch, provenance
    from patchlm.paths import check_output
    from patchlm.quant.export import MOE_EXPORT
    from patchlm.quant.kind import is_quantized
    from patchlm.quant.quantize import quantize_model
    from patchlm.quant.units import model_units

    check_output(out, force)
    if export is not None:
        check_output(export, force)
    cfg = QuantConfig(**cv.values(QuantConfig))
    patches = load_patches(patch)
    base = load_base(model)
    if is_quantized(base.model):
        raise ConfigError(f"model {model} is already quantized (its config has a quantization_config); "
                          "quantize the full-precision model instead")
    if export is not None and any(u.expert is not None for u in model_units(base.model)):
        raise ConfigError(f"--export: {MOE_EXPORT}")
    paths = [str(p) for p in (patch or [])]
    changed = bake_patches(base, patches, paths) if patches else set()
    spec, tensors = quantize_model(base.model, base.tokenizer, cfg, changed=changed, log=status)
    spec["baked"] = [pth for pth, p in zip(paths, patches) if p.kind != "drop" and p.kind != "router"]
    spec["with_depth"] = [pth for pth, p in zip(paths, patches) if p.kind in ("drop", "router")]
    qp = Patch(kind="quant", base=base.ref(), spec=spec, tensors=tensors,
               provenance=provenance(patches=paths or None, seed=cfg.seed))
    if export is not None:
        from patchlm.quant.export import export_gptq

        export_gptq(base, spec, tensors, export, force=force)
    qp.save(out, force=force)
    file_bytes = (out / "tensors.safetensors").stat().st_size
    report = {"out": str(out), "method": spec["method"], "plan": spec["plan"], "avg_bits": round(spec["avg_bits"], 4),
              "units": len(spec["units"]), "file_bytes": file_bytes, "rtn_fallback": len(spec["rtn_fallback"]),
              "seconds": spec["seconds"], "export": str(export) if export else None}
    if json_out:
        print_json({**report, "rtn_fallback_units": spec["rtn_fallback"]})
        return
    status(f"wrote {out} (average {spec['avg_bits']:.3f} bits)")
    print_table([report], ["method", "plan", "avg_bits", "units", "file_bytes", "rtn_fallback", "seconds"],
                f"quantized {model}")


def register(app: typer.Typer) -> None:
    app.command("quant")(quant)
