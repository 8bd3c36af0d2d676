"""Quantize a (patched) causal LM: calibration windows, per-layer Hessians, GPTQ or RTN per unit, block by block.

GPTQ runs layer by layer: the inputs of decoder layer i are the outputs of layer i-1 *after* it was quantized, so
every layer corrects for the error of those before it. Within a layer all units see the full-precision layer's
activations. For a fused MoE experts module the Hessian of expert e's gate_up slice comes from the tokens the
router sends to e, and its down slice's from act(gate) * up of those tokens; an expert with fewer than
expert_min_tokens routed tokens (a zero Hessian would zero its weights) is quantized by RTN and reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from patchlm.data import load_task
from patchlm.data.features import example_text, pack_blocks
from patchlm.errors import ConfigError, DataError
from patchlm.models.parts import model_device
from patchlm.quant.config import KEEP, QuantConfig
from patchlm.quant.gptq import Hessian, HessianError, check_group, gptq, rtn
from patchlm.quant.kind import QuantExperts, QuantMatrix, install, is_quantized, set_kernel
from patchlm.quant.plans import Choice, Plan, allocate, average_bits, parse_heuristic, plan_from_rules, priority
from patchlm.quant.plans import uniform_plan as _uniform
from patchlm.quant.predictor import block_importance
from patchlm.quant.units import Unit, decoder_layers, model_units


class _Stop(Exception):
    pass


def calibration_windows(tokenizer, cfg: QuantConfig) -> torch.Tensor:
    """cfg.calib_samples windows of cfg.calib_length tokens of the calibration task's train text, [N, T]."""
    t = load_task(cfg.calib, seed=cfg.seed)
    texts = [example_text(t, e, tokenizer) for e in t.split("train")]
    n, T = cfg.calib_samples, cfg.calib_length
    blocks = [b for b in pack_blocks(tokenizer, texts, T, max_tokens=n * T) if len(b) == T][:n]
    if not blocks:
        raise DataError(f"calibration task {cfg.calib} has too little train text for one window of {T} tokens")
    return torch.tensor(blocks, dtype=torch.long)


def check_calibration(windows: torch.Tensor, units: list[Unit], plan: Plan) -> None:
    """Refuse calibration data with fewer tokens than the widest GPTQ input (its Hessian would be singular)."""
    need = max((u.shape[1] for u in units if plan[u.name].bits != KEEP and u.expert is None), default=0)
    have = windows.numel()
    if have < need:
        raise ConfigError(f"calibration data has {have} tokens ({windows.shape[0]} x {windows.shape[1]}); a GPTQ "
                          f"Hessian of the {need}-wide inputs needs at least {need} tokens: raise calib_samples or "
                          "calib_length", field="calib_samples")


# ---------------------------------------------------------------- capture
@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """For each batch: the hidden states entering layer 0 and, per layer, the keyword arguments it was called
    with (masks and rotary embeddings differ per layer type in some families)."""
    _, layers = decoder_layers(model)
    device = model_device(model)
    xs, kws = [], []
    current: dict[int, dict] = {}

    def pre(i):
        def hook(mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            kw.pop("cache", None)
            current[i] = kw
            if i == 0:
                xs.append((args[0] if args else kwargs["hidden_states"]).detach())
            if i == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for s in range(0, windows.shape[0], batch_size):
            current = {}
            try:
                model(input_ids=windows[s:s + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            kws.append([current[i] for i in range(len(layers))])
    finally:
        for h in handles:
            h.remove()
    return xs, kws


def _run_layer(layer, x, kw):
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def expert_usage(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[tuple[int, int], float]:
    """(layer, expert) -> share of the calibration tokens the router sends to the expert (top-k counts)."""
    _, layers = decoder_layers(model)
    counts: dict[tuple[int, int], float] = {}
    handles = []
    for i, layer in enumerate(layers):
        for _, mod in layer.named_modules():
            if hasattr(mod, "gate_up_proj") or isinstance(mod, QuantExperts):
                def hook(m, args, i=i):
                    idx = args[1].reshape(-1)
                    for e, c in zip(*torch.unique(idx, return_counts=True)):
                        counts[(i, int(e))] = counts.get((i, int(e)), 0.0) + float(c)
                handles.append(mod.register_forward_pre_hook(hook))
    try:
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s:s + batch_size].to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = windows.numel()
    return {k: v / n for k, v in counts.items()}


# ---------------------------------------------------------------- plans
def resolve_plan(model, tokenizer, cfg: QuantConfig, units: list[Unit], windows: Callable[[], torch.Tensor],
                 log: Callable[[str], None] = lambda s: None) -> tuple[Plan, dict]:
    """The plan of cfg (uniform bits, rules, or a heuristic at a budget) and what it was built from."""
    if cfg.bits is not None:
        return _uniform(units, cfg.bits, cfg.group_size), {"plan": f"all={cfg.bits}"}
    h = parse_heuristic(cfg.plan)
    if h is None:
        return plan_from_rules(cfg.plan, units, cfg.group_size), {"plan": cfg.plan}
    name, budget = h
    info: dict = {"plan": cfg.plan, "heuristic": name, "budget": budget}
    if name == "uniform":
        b = int(budget)
        if b != budget or b not in (2, 3, 4, 8):
            raise ConfigError(f"a uniform plan needs an implemented bit width as its budget, got {budget:g}",
                              field="plan")
        return _uniform(units, b, cfg.group_size), info
    kw: dict = {"seed": cfg.seed}
    if name == "outlier":
        kw["weights"] = lambda u: unit_weight(model, u)
    elif name == "frequency":
        kw["usage"] = expert_usage(model, windows(), cfg.batch_size)
        info["usage"] = {f"{k[0]}.{k[1]}": round(v, 4) for k, v in sorted(kw["usage"].items())}
    elif name == "predictor":
        kw["block_scores"] = block_importance(model, windows(), cfg, log=log)
        info["block_scores"] = {str(k): round(v, 5) for k, v in kw["block_scores"].items()}
    order = priority(name, units, **kw)
    return allocate(units, order, budget, cfg.low_bits, cfg.high_bits, cfg.group_size), info


def unit_weight(model: nn.Module, u: Unit) -> torch.Tensor:
    """The float weight [out, in] of a unit of the (unquantized) model."""
    if u.expert is None:
        return model.get_submodule(u.name).weight
    return getattr(model.get_submodule(u.experts_module), u.type)[u.expert]


# ---------------------------------------------------------------- quantization
def _quantize_one(w, H: Hessian | None, choice: Choice, cfg: QuantConfig, min_tokens: int):
    """(Quantized, method used, why RTN) for one matrix."""
    if cfg.method == "rtn":
        return rtn(w, choice.bits, choice.group_size), "rtn", None
    if H is None or H.n < min_tokens:
        return rtn(w, choice.bits, choice.group_size), "rtn", f"{0 if H is None else H.n} calibration tokens"
    try:
        return gptq(w, H.H, choice.bits, choice.group_size, cfg.act_order, cfg.damp, cfg.damp_retries,
                    cfg.block_size), "gptq", None
    except HessianError as e:
        return rtn(w, choice.bits, choice.group_size), "rtn", str(e)


@torch.no_grad()
def quantize_model(model: nn.Module, tokenizer, cfg: QuantConfig, plan: Plan | None = None,
                   changed: set[str] | frozenset[str] = frozenset(), windows: torch.Tensor | None = None,
                   log: Callable[[str], None] = lambda s: None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize `model` in place by `plan` (default: resolve cfg's); returns (spec, tensors) of the quant patch.

    changed: units whose weights differ from the base (patches baked in); those kept at 16 bits are stored.
    """
    if is_quantized(model):
        raise ConfigError("this model is already quantized (it holds quantized modules or comes from a quantized "
                          "checkpoint); quantize the full-precision model instead")
    model.eval()
    t0 = time.perf_counter()
    units = model_units(model)
    if not units:
        raise ConfigError("this model has no linear modules or experts to quantize", field="plan")
    cache: dict[str, torch.Tensor] = {}

    def get_windows():
        if "w" not in cache:
            cache["w"] = calibration_windows(tokenizer, cfg) if windows is None else windows
        return cache["w"]

    info: dict = {}
    if plan is None:
        plan, info = resolve_plan(model, tokenizer, cfg, units, get_windows, log=log)
    for u in units:
        c = plan[u.name]
        if c.bits != KEEP:
            check_group(u.shape[1], c.group_size, f" of {u.name}")
    gptq_needed = cfg.method == "gptq" and any(plan[u.name].bits != KEEP for u in units)
    per_unit: dict[str, dict] = {}
    fallbacks: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    _, layers = decoder_layers(model)
    if gptq_needed:
        win = get_windows()
        check_calibration(win, units, plan)
        xs, kws = capture_layer_inputs(model, win, cfg.batch_size)
    by_layer: dict[int, list[Unit]] = {}
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
    for i, layer in enumerate(layers):
        lu = [u for u in by_layer.get(i, []) if plan[u.name].bits != KEEP]
        hs: dict[str, Hessian] = {}
        if gptq_needed and lu:
            hs = _layer_hessians(model, layer, lu, xs, kws, i)
        for u in by_layer.get(i, []):
            c = plan[u.name]
            w = unit_weight(model, u).detach().float()
            if c.bits == KEEP:
                if u.name in changed:
                    tensors[f"{u.name}.weight"] = w.to(torch.bfloat16)
                    per_unit[u.name] = {"bits": KEEP, "group_size": 0, "shape": list(u.shape), "expert": u.expert,
                                        "experts_module": u.experts_module, "method": "keep"}
                continue
            need = cfg.expert_min_tokens if u.expert is not None else 1
            q, used, why = _quantize_one(w, hs.get(u.name), c, cfg, need)
            if why is not None and cfg.method == "gptq":
                fallbacks.append({"unit": u.name, "reason": why})
                log(f"RTN fallback for {u.name}: {why}")
            m = QuantMatrix.from_quantized(q)
            tensors.update(m.tensors(u.name))
            per_unit[u.name] = {"bits": c.bits, "group_size": c.group_size, "shape": list(u.shape),
                                "expert": u.expert, "experts_module": u.experts_module, "method": used,
                                **({"damp": q.report["damp"], "dead_columns": q.report["dead_columns"]}
                                   if used == "gptq" else {})}
            if u.expert is None:
                lin = model.get_submodule(u.name)
                if lin.bias is not None:
                    tensors[f"{u.name}.bias"] = lin.bias.detach().float()
        _install_layer(model, i, per_unit, tensors, by_layer.get(i, []))
        if gptq_needed and i + 1 < len(layers):
            xs = [_run_layer(layer, x, kw[i]) for x, kw in zip(xs, kws)]
        log(f"layer {i + 1}/{len(layers)} quantized")
    avg = average_bits(plan, units)
    set_kernel(model, cfg.kernel)  # calibration ran through the float32 dequantized units; now run as reloaded
    spec = {"method": cfg.method, "plan": info.get("plan", cfg.plan or f"all={cfg.bits}"), "avg_bits": avg,
            "group_size": cfg.group_size, "act_order": cfg.act_order, "kernel": cfg.kernel, "units": per_unit,
            "calibration": None if not gptq_needed else {"task": cfg.calib, "samples": cfg.calib_samples,
                                                         "length": cfg.calib_length, "seed": cfg.seed},
            "rtn_fallback": fallbacks, "seconds": round(time.perf_counter() - t0, 2),
            **{k: v for k, v in info.items() if k != "plan"}}
    return spec, tensors


def _layer_hessians(model, layer, lu: list[Unit], xs, kws, i) -> dict[str, Hessian]:
    """Run layer i on its inputs with hooks that accumulate each unit's Hessian."""
    hs: dict[str, Hessian] = {}
    handles = []
    experts: dict[str, list[Unit]] = {}
    for u in lu:
        if u.expert is None:
            hs[u.name] = Hessian(u.shape[1])
            mod = model.get_submodule(u.name)
            handles.append(mod.register_forward_hook(lambda m, a, o, h=hs[u.name]: h.add(a[0])))
        else:
            experts.setdefault(u.experts_module, []).append(u)
    for name, eu in experts.items():
        mod = model.get_submodule(name)
        want = {(u.expert, u.type): u for u in eu}
        for u in eu:
            hs[u.name] = Hessian(u.shape[1])

        def hook(m, args, want=want):
            x, idx = args[0], args[1]
            for e in torch.unique(idx).tolist():
                tok = torch.where(idx == e)[0]
                if not len(tok) or e >= m.gate_up_proj.shape[0]:
                    continue
                xe = x[tok]
                if (e, "gate_up_proj") in want:
                    hs[want[(e, "gate_up_proj")].name].add(xe)
                if (e, "down_proj") in want:
                    g, up = nn.functional.linear(xe, m.gate_up_proj[e]).chunk(2, dim=-1)
                    hs[want[(e, "down_proj")].name].add(m.act_fn(g) * up)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for x, kw in zip(xs, kws):
            _run_layer(layer, x, kw[i])
    finally:
        for h in handles:
            h.remove()
    return hs


def _install_layer(model, i, per_unit: dict, tensors: dict, lu: list[Unit]) -> None:
    """Swap layer i's quantized units into the model now (the next layer's inputs run through them)."""
    units = {u.name: per_unit[u.name] for u in lu if u.name in per_unit}
    if units:
        install(model, units, tensors)
