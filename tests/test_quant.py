"""Post-training quantization: packing, GPTQ vs RTN, damping, dead columns, groups, act-order, MoE experts without
calibration tokens, bit plans and heuristics, the quant patch kind, the GPTQ export layout, the CLI contract and its
bad input: on tiny-random-llama and a tiny upcycled Mixtral."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, sample_ids

from patchlm.errors import ConfigError, PatchlmError
from patchlm.patch import Patch
from patchlm.quant import QuantConfig, dequantize, gptq, pack, quantize_model, rtn, unpack
from patchlm.quant.gptq import Hessian, HessianError, layer_error
from patchlm.quant.plans import Choice, allocate, average_bits, outlier_score, parse_rules, plan_from_rules, priority
from patchlm.quant.units import model_units

TINY = "tiny-random-llama"
SMALL = dict(group_size=32, calib_samples=8, calib_length=64)  # calibration small enough for a test


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=sample_ids() if ids is None else ids).logits.float()


def correlated(n=512, d=64, seed=0):
    """Inputs with correlated channels and a few outlier channels (where GPTQ beats RTN)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 2 * mix)
    x[:, :4] *= 5
    return x


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 61, 256])
def test_pack_unpack_round_trip_is_exact_and_sized_bits_over_8(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n if bits == 8 else -(-n // 8) * bits)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 15]), 4).tolist() == [0x21, 0x43, 0x65, 0xF7]


# ---------------------------------------------------------------- GPTQ / RTN on one matrix
def test_gptq_error_is_below_rtn_on_the_same_layer():
    x = correlated()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    h = Hessian(64)
    h.add(x)
    for bits in (2, 3, 4):
        q_g, q_r = gptq(w, h.H, bits, 32), rtn(w, bits, 32)
        e_g, e_r = layer_error(w, q_g.dequantize(), h.H), layer_error(w, q_r.dequantize(), h.H)
        assert e_g < 0.8 * e_r, (bits, e_g, e_r)


def test_rtn_codes_and_scales_by_hand():
    w = torch.tensor([[0.0, 0.5, 1.0, 1.5]])
    q = rtn(w, 2, 0)  # one group, range [0, 1.5], 3 steps of 0.5
    assert q.codes.tolist() == [[0, 1, 2, 3]] and q.zeros.tolist() == [[0]]
    assert torch.allclose(q.dequantize(), w, atol=1e-3)


def test_hessian_is_the_running_mean_of_2xxT():
    x = torch.randn(10, 3)
    h = Hessian(3)
    h.add(x[:4])
    h.add(x[4:])
    assert torch.allclose(h.H, 2 * x.double().T @ x.double() / 10) and h.n == 10


def test_dampening_increases_when_cholesky_fails():
    H = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # indefinite: eigenvalues -0.05 and 2.05
    q = gptq(torch.randn(4, 2), H, 4, 0, damp=0.01)
    assert q.report["damp"] == pytest.approx(0.1)
    with pytest.raises(HessianError, match="singular"):
        gptq(torch.randn(4, 2), H, 4, 0, damp=0.01, damp_retries=0)


def test_dead_columns_are_kept_and_reported_and_a_zero_hessian_is_refused():
    x = correlated(d=16)
    x[:, 3] = 0
    h = Hessian(16)
    h.add(x)
    w = torch.randn(8, 16)
    q = gptq(w, h.H, 4, 0)
    assert q.report["dead_columns"] == 1
    assert torch.allclose(q.dequantize()[:, 3], w[:, 3], atol=float(q.scales.float().max()))  # not zeroed
    with pytest.raises(HessianError, match="no calibration input"):
        gptq(w, torch.zeros(16, 16), 4, 0)


def test_group_size_gives_one_scale_per_group_and_must_divide():
    w = torch.randn(6, 64)
    h = Hessian(64)
    h.add(correlated())
    q = gptq(w, h.H, 3, 16)
    assert q.scales.shape == (6, 4) and q.zeros.shape == (6, 4)
    assert torch.allclose(q.dequantize(), dequantize(q.codes, q.scales, q.zeros, 16))
    with pytest.raises(ConfigError, match="does not divide the input size 64"):
        rtn(w, 4, 24)


def test_act_order_records_g_idx_and_stays_below_rtn():
    x = correlated()
    h = Hessian(64)
    h.add(x)
    w = torch.randn(32, 64) * 0.05
    q = gptq(w, h.H, 3, 16, act_order=True)
    assert q.g_idx is not None and q.g_idx.shape == (64,) and sorted(torch.bincount(q.g_idx).tolist()) == [16] * 4
    assert not torch.equal(q.g_idx.long(), torch.arange(64) // 16)  # the order really changed
    assert layer_error(w, q.dequantize(), h.H) < layer_error(w, rtn(w, 3, 16).dequantize(), h.H)


# ---------------------------------------------------------------- the model and the patch kind
def test_quantized_model_saves_loads_and_gives_the_same_logits(tiny, tmp_path):
    spec, tensors = quantize_model(tiny.model, tiny.tokenizer, QuantConfig(bits=4, **SMALL))
    want = logits(tiny.model)
    Patch(kind="quant", base=tiny.ref(), spec=spec, tensors=tensors).save(tmp_path / "q")
    from patchlm.models import load_base

    b = load_base(TINY)
    ref = logits(b.model)
    Patch.load(tmp_path / "q").apply(b)
    got = logits(b.model)
    assert torch.allclose(got, want, atol=1e-5)
    assert 0 < (got - ref).abs().max() < ref.abs().max()
    from patchlm.patch import get_kind

    with pytest.raises(PatchlmError, match="reload the base"):
        get_kind("quant").detach(b.model)


def test_int4_kernel_runs_the_4bit_units_near_dequant_and_keeps_the_codes_exactly(tiny, tmp_path):
    from patchlm.models import load_base
    from patchlm.patch import get_kind
    from patchlm.quant.kind import Int4PackMatrix, QuantLinear, set_kernel

    # 4-bit at group 32 (the kernel's), the attention at 3 bits (dequantized): a mixed model
    spec, tensors = quantize_model(tiny.model, tiny.tokenizer, QuantConfig(plan="all=4;attn=3", **SMALL))
    assert spec["kernel"] == "auto"
    lin = [m for m in tiny.model.modules() if isinstance(m, QuantLinear)]
    kinds = {type(m.matrix).__name__ for m in lin}
    assert kinds == {"Int4PackMatrix", "QuantMatrix"}
    fast = logits(tiny.model)
    state = get_kind("quant").state(tiny.model)  # the codes read back from torch's layout
    assert set(state) == set(tensors) and all(torch.equal(state[k], tensors[k]) for k in tensors)
    counts = set_kernel(tiny.model, "dequant")
    assert counts["int4pack"] == 0 and counts["dequant"] == len(lin)
    exact = logits(tiny.model)
    # bfloat16 activations and scales inside the kernel: near, not equal
    err = (fast - exact).abs().max()
    assert 0 < err < 0.05 * exact.abs().max(), err
    assert set_kernel(tiny.model, "auto")["int4pack"] == sum(isinstance(m.matrix, Int4PackMatrix) for m in lin) > 0
    assert torch.equal(logits(tiny.model), fast)
    # the saved patch loads with its kernel; one saved with kernel dequant runs float32
    Patch(kind="quant", base=tiny.ref(), spec=spec, tensors=tensors).save(tmp_path / "q")
    b = load_base(TINY)
    Patch.load(tmp_path / "q").apply(b)
    assert torch.equal(logits(b.model), fast)
    Patch(kind="quant", base=tiny.ref(), spec={**spec, "kernel": "dequant"}, tensors=tensors).save(tmp_path / "d")
    b = load_base(TINY)
    Patch.load(tmp_path / "d").apply(b)
    assert torch.allclose(logits(b.model), exact, atol=1e-5)


def test_int4_layout_order_is_a_permutation_and_refusals_name_the_reason():
    from patchlm.quant.kind import Int4PackMatrix, QuantMatrix, int4pack_refusal

    g = torch.Generator().manual_seed(0)
    for rows, cols in [(16, 32), (48, 96), (64, 576)]:
        codes = torch.randint(0, 16, (rows, cols), generator=g)
        ng = cols // 32
        m = QuantMatrix((rows, cols), 4, 32, pack(codes, 4), torch.rand(rows, ng, generator=g) + 0.1,
                        pack(torch.randint(0, 16, (rows, ng), generator=g), 4))
        k = Int4PackMatrix(m)
        assert torch.equal(k.codes(), codes.to(torch.uint8))
        x = torch.randn(3, cols, generator=g)
        ref = x @ m.weight().T
        assert (k.matmul(x) - ref).abs().max() < 0.02 * ref.abs().max()
    z = pack(torch.zeros(24, 1, dtype=torch.int64), 4)
    three = QuantMatrix((16, 32), 3, 32, pack(torch.zeros(16, 32, dtype=torch.int64), 3), torch.ones(16, 1),
                        pack(torch.zeros(16, 1, dtype=torch.int64), 3))
    assert "4-bit" in int4pack_refusal(three)
    odd = QuantMatrix((24, 32), 4, 32, pack(torch.zeros(24, 32, dtype=torch.int64), 4), torch.ones(24, 1), z)
    assert "multiple of 16" in int4pack_refusal(odd)
    whole = QuantMatrix((16, 48), 4, 0, pack(torch.zeros(16, 48, dtype=torch.int64), 4), torch.ones(16, 1),
                        pack(torch.zeros(16, 1, dtype=torch.int64), 4))
    assert "group size 0" in int4pack_refusal(whole)
    perm = QuantMatrix((16, 64), 4, 32, pack(torch.zeros(16, 64, dtype=torch.int64), 4), torch.ones(16, 2),
                       pack(torch.zeros(16, 2, dtype=torch.int64), 4), torch.arange(64, dtype=torch.int32) % 2)
    assert "act-order" in int4pack_refusal(perm)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_patch_file_is_bits_over_16_of_bf16(tiny, tmp_path, bits):
    units = model_units(tiny.model)
    bf16_bytes = 2 * sum(u.params for u in units)
    spec, tensors = quantize_model(tiny.model, tiny.tokenizer, QuantConfig(bits=bits, method="rtn", group_size=32))
    Patch(kind="quant", base=tiny.ref(), spec=spec, tensors=tensors).save(tmp_path / "q")
    size = (tmp_path / "q" / "tensors.safetensors").stat().st_size
    # codes at bits/16 of bf16, plus a float16 scale and a packed zero per 32 weights, plus the file's header
    want = bf16_bytes * bits / 16
    overhead = bf16_bytes / 2 / 32 * (2 + bits / 8)
    assert want < size < want + overhead + 16_000, (size, want)


def test_gptq_beats_rtn_on_the_model_output(tiny):
    from patchlm.models import load_base

    ref = logits(tiny.model)
    errs = {}
    for method in ("gptq", "rtn"):
        b = load_base(TINY)
        quantize_model(b.model, b.tokenizer, QuantConfig(bits=3, method=method, **SMALL))
        errs[method] = float((logits(b.model) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_quantizing_twice_is_refused(tiny):
    quantize_model(tiny.model, tiny.tokenizer, QuantConfig(bits=8, method="rtn", group_size=32))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(tiny.model, tiny.tokenizer, QuantConfig(bits=8, method="rtn", group_size=32))


def test_calibration_too_short_names_the_needed_size(tiny):
    with pytest.raises(ConfigError, match="needs at least 128 tokens"):
        quantize_model(tiny.model, tiny.tokenizer, QuantConfig(bits=4, group_size=32, calib_samples=2,
                                                               calib_length=16))


# ---------------------------------------------------------------- MoE
def _moe(tiny):
    """A tiny upcycled Mixtral (3 experts, top-1) whose router never picks expert 2."""
    from patchlm.moe import Expert, MoeConfig, upcycle

    up = upcycle(TINY, [Expert(source=TINY) for _ in range(3)], MoeConfig(gate_mode="random", top_k=1), base=tiny)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in up.model.model.layers:
            ex = layer.mlp.experts
            ex.gate_up_proj.add_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.02)
            ex.down_proj.add_(torch.randn(ex.down_proj.shape, generator=g) * 0.02)
            r = layer.mlp.gate.weight
            v = torch.randn(r.shape[1], generator=g)
            r[0], r[1], r[2] = v, -v, 0.0  # max(x.v, -x.v) >= 0 = expert 2's logit: it only wins ties
    return up


def test_an_expert_without_calibration_tokens_falls_back_to_rtn_and_is_reported(tiny):
    up = _moe(tiny)
    units = model_units(up.model)
    assert sum(u.expert is not None for u in units) == 4 * 3 * 2
    before = {u.name: getattr(up.model.get_submodule(u.experts_module), u.type)[u.expert].detach().clone()
              for u in units if u.expert == 2}
    ref = logits(up.model)
    spec, tensors = quantize_model(up.model, up.tokenizer, QuantConfig(bits=4, **SMALL))
    fell = {f["unit"] for f in spec["rtn_fallback"]}
    assert fell == set(before)  # expert 2 of every layer, both slices, and nothing else
    assert all("0 calibration tokens" in f["reason"] for f in spec["rtn_fallback"])
    for name, w in before.items():
        assert spec["units"][name]["method"] == "rtn"
        from patchlm.quant.kind import QuantMatrix

        m = QuantMatrix(tuple(w.shape), 4, 32, tensors[f"{name}.qweight"], tensors[f"{name}.scales"],
                        tensors[f"{name}.qzeros"])
        assert torch.allclose(m.weight(), rtn(w, 4, 32).dequantize())  # RTN of the weights, not zeros
        assert float(m.weight().abs().sum()) > 0
    assert sum(spec["units"][u.name]["method"] == "gptq" for u in units) > 0
    got = logits(up.model)
    assert (got - ref).abs().max() < 0.5 * ref.abs().max()


def test_frequency_heuristic_ranks_experts_by_routed_tokens(tiny):
    from patchlm.quant.quantize import expert_usage, resolve_plan

    up = _moe(tiny)
    cfg = QuantConfig(plan="heuristic:frequency@3", method="rtn", **SMALL)
    from patchlm.quant.quantize import calibration_windows

    win = calibration_windows(up.tokenizer, cfg)
    usage = expert_usage(up.model, win, 4)
    assert all(usage.get((i, 2), 0) == 0 for i in range(4)) and sum(usage.values()) == pytest.approx(4.0)
    plan, info = resolve_plan(up.model, up.tokenizer, cfg, model_units(up.model), lambda: win)
    units = model_units(up.model)
    assert average_bits(plan, units) <= 3 + 1e-9
    assert all(plan[u.name].bits == 2 for u in units if u.expert == 2)  # never used: fewest bits
    assert "usage" in info


@pytest.mark.timeout(120)
def test_cli_quantizes_a_saved_moe_and_eval_runs_it_and_export_is_refused_first(tiny, tmp_path, capsys):
    from patchlm.moe.upcycle import save_upcycled

    save_upcycled(_moe(tiny), tmp_path / "moe")
    small = ["--group-size", "32", "--calib-samples", "8", "--calib-length", "64"]
    code, _, err = run_cli(["quant", "--model", str(tmp_path / "moe"), "--bits", "4", *small, "--out",
                            str(tmp_path / "bad"), "--export", str(tmp_path / "bad-gptq")], capsys)
    assert code == 2 and "export of fused MoE experts is not supported" in err and "layer 1/" not in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-gptq").exists()
    code, out, err = run_cli(["quant", "--model", str(tmp_path / "moe"), "--plan", "all=2;experts:0=4;attn=16",
                              *small, "--out", str(tmp_path / "q"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["rtn_fallback"] == 8 and 2 < rep["avg_bits"] < 16  # expert 2 of 4 layers x 2 slices: no tokens
    code, out, err = run_cli(["eval", "--model", str(tmp_path / "moe"), "--patch", str(tmp_path / "q"), "--task",
                              "news_corpus", "--limit", "4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["perplexity"] > 1


# ---------------------------------------------------------------- plans
def test_plan_rules_later_win_and_average_bits_is_params_weighted(tiny):
    units = model_units(tiny.model)
    plan = plan_from_rules("all=2; attn=4; first:1=8; type:down_proj=3/64; re:layers\\.3\\.self_attn\\.v_proj=16",
                           units, 32)
    byname = {u.name: u for u in units}
    assert plan["model.layers.0.self_attn.q_proj"] == Choice(8, 32)
    assert plan["model.layers.1.self_attn.q_proj"] == Choice(4, 32)
    assert plan["model.layers.0.mlp.down_proj"] == Choice(3, 64)
    assert plan["model.layers.2.mlp.up_proj"] == Choice(2, 32)
    assert plan["model.layers.3.self_attn.v_proj"].bits == 16
    want = sum(plan[n].bits * byname[n].params for n in plan) / sum(u.params for u in units)
    assert average_bits(plan, units) == pytest.approx(want)


@pytest.mark.parametrize("text,words", [
    ("expert:0.1=4", "matches no module"), ("type:w9=4", "matches no module"), ("re:nothing_here=4", "matches no"),
    ("all=5", "not implemented"), ("all=four", "integers"), ("attn", "SELECTOR=BITS"), ("bogus=4", "unknown plan"),
    ("shared=4", "matches no module"), ("heuristic:magic@3", "unknown heuristic"), ("heuristic:attn", "AVG_BITS"),
])
def test_bad_plans_name_the_problem(tiny, text, words):
    with pytest.raises(ConfigError, match=words):
        from patchlm.quant.quantize import resolve_plan

        resolve_plan(tiny.model, tiny.tokenizer, QuantConfig(plan=text, method="rtn", **SMALL),
                     model_units(tiny.model), lambda: None)


def test_allocate_spends_the_budget_in_priority_order(tiny):
    units = model_units(tiny.model)
    order = priority("attn", units)
    plan = allocate(units, order, 2.7, 2, 4, 32)  # attention is 1/3 of tiny's linear params: 2 + 2/3 bits
    assert average_bits(plan, units) == pytest.approx(2 + 2 / 3)
    assert all(plan[u.name].bits == (4 if u.group == "attn" else 2) for u in units)
    plan = allocate(units, order, 2.5, 2, 4, 32)
    assert 2.4 < average_bits(plan, units) <= 2.5
    assert parse_rules("all=3\n# a comment\nattn=4/0") == [("all", 3, None), ("attn", 4, 0)]
    with pytest.raises(ConfigError, match="outside"):
        allocate(units, order, 5, 2, 4, 32)


def test_outlier_score_by_hand():
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 10.0]])  # column 1: max 10, mean 4
    assert outlier_score(w) == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["outlier", "predictor", "random", "first-k", "down-first", "mlp", "uniform"])
def test_heuristics_meet_the_budget(tiny, name):
    from patchlm.quant.quantize import calibration_windows, resolve_plan

    cfg = QuantConfig(plan=f"heuristic:{name}@3", method="rtn", predictor_steps=10, **SMALL)
    win = calibration_windows(tiny.tokenizer, cfg)
    units = model_units(tiny.model)
    plan, info = resolve_plan(tiny.model, tiny.tokenizer, cfg, units, lambda: win)
    assert 2.75 < average_bits(plan, units) <= 3 + 1e-9
    if name == "predictor":
        assert set(info["block_scores"]) == {"0", "1", "2", "3"}


# ---------------------------------------------------------------- CLI
@pytest.mark.timeout(120)
def test_cli_quant_then_eval_with_the_patch(tmp_path, capsys):
    code, out, err = run_cli(["quant", "--model", TINY, "--bits", "4", "--group-size", "32", "--calib-samples", "8",
                              "--calib-length", "64", "--out", str(tmp_path / "q"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["avg_bits"] == 4 and rep["file_bytes"] == (tmp_path / "q" / "tensors.safetensors").stat().st_size
    code, out, err = run_cli(["eval", "--model", TINY, "--patch", str(tmp_path / "q"), "--task", "news_corpus",
                              "--limit", "4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["perplexity"] > 1


@pytest.mark.timeout(120)
def test_cli_bakes_a_lora_patch_before_quantizing(tiny, tmp_path, capsys):
    from test_moe import lora_patch

    from patchlm.models import load_base

    lora_patch(tiny, 3, scale=0.3).save(tmp_path / "lora")
    want = logits(Patch.load(tmp_path / "lora").apply(load_base(TINY)))
    code, _, err = run_cli(["quant", "--model", TINY, "--patch", str(tmp_path / "lora"), "--bits", "8",
                            "--group-size", "32", "--calib-samples", "8", "--calib-length", "64",
                            "--method", "gptq", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    b = load_base(TINY)
    got = logits(Patch.load(tmp_path / "q").apply(b))
    base = logits(load_base(TINY).model)
    assert (got - want).abs().max() < 0.2 * (base - want).abs().max()


def _bad(capsys, tmp_path, args, *words):
    out = tmp_path / "out"
    code, _, err = run_cli(["quant", "--model", TINY, *args, "--out", str(out)], capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.timeout(120)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys):
    small = ["--calib-samples", "8", "--calib-length", "64"]
    _bad(capsys, tmp_path, ["--bits", "4", *small], "does not divide", "--group-size")
    _bad(capsys, tmp_path, ["--bits", "5", "--group-size", "32"], "not implemented", "--bits")
    _bad(capsys, tmp_path, ["--group-size", "32"], "exactly one")
    _bad(capsys, tmp_path, ["--bits", "4", "--plan", "all=4", "--group-size", "32"], "exactly one")
    _bad(capsys, tmp_path, ["--plan", "expert:0.0=4", "--group-size", "32", *small], "matches no module", "--plan")
    _bad(capsys, tmp_path, ["--plan", "attn=6", "--group-size", "32"], "not implemented")
    _bad(capsys, tmp_path, ["--bits", "4", "--group-size", "32", "--calib-samples", "1", "--calib-length", "32"],
         "needs at least 128 tokens", "--calib-samples")
    _bad(capsys, tmp_path, ["--bits", "4", "--method", "awq", "--group-size", "32"], "unknown quantization method")
    _bad(capsys, tmp_path, ["--bits", "4", "--group-size", "-1"], "group_size must be >= 0")
    _bad(capsys, tmp_path, ["--plan", "heuristic:uniform@2.5", "--group-size", "32", "--method", "rtn"],
         "uniform plan")
    code, _, err = run_cli(["quant", "--model", TINY, "--bits", "8", "--method", "rtn", "--group-size", "32",
                            "--out", str(tmp_path / "q8")], capsys)
    assert code == 0, err
    _bad(capsys, tmp_path, ["--patch", str(tmp_path / "q8"), "--bits", "4", "--group-size", "32"],
         "already a quant patch")


# ---------------------------------------------------------------- GPTQ checkpoint layout
@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True), (2, False), (8, False)])
def test_gptq_layout_packs_int32_words_and_reads_back_to_the_same_logits(tiny, tmp_path, bits, act_order):
    from safetensors.torch import load_file

    from patchlm.quant.export import export_gptq, read_gptq

    plan = f"all={bits}; attn=8/64; layer:3=16" if bits != 8 else "all=8"
    spec, tensors = quantize_model(tiny.model, tiny.tokenizer, QuantConfig(plan=plan, act_order=act_order,
                                                                           kernel="dequant", **SMALL))
    want = logits(tiny.model)
    export_gptq(tiny, spec, tensors, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["desc_act"] is act_order
    st = load_file(str(tmp_path / "g" / "model.safetensors"))
    n = "model.layers.0.mlp.down_proj"  # in 128, out 64
    assert st[f"{n}.qweight"].dtype == torch.int32 and st[f"{n}.qweight"].shape == (128 * bits // 32, 64)
    assert st[f"{n}.qzeros"].shape == (4, 64 * bits // 32) and st[f"{n}.scales"].shape == (4, 64)
    if bits != 8:
        assert cfg["dynamic"]["+:^model\\.layers\\.0\\.self_attn\\.q_proj$"] == {"bits": 8, "group_size": 64}
        assert "-:^model\\.layers\\.3\\.mlp\\.up_proj$" in cfg["dynamic"]
    got = logits(read_gptq(tmp_path / "g"))
    assert (got - want).abs().max() < 1e-3 * max(1.0, float(want.abs().max()))


def test_int4_qweight_word_holds_eight_input_rows_low_bits_first():
    from patchlm.quant.export import gptq_tensors

    codes = torch.arange(16).view(1, 16).repeat(8, 1)  # out 8, in 16
    t = gptq_tensors("m", codes, torch.ones(8, 1), torch.full((8, 1), 8), 4, 0, None)
    assert t["m.qweight"].shape == (2, 8)  # [in * bits / 32, out]
    assert int(t["m.qweight"][0, 0]) == 0x76543210 and int(t["m.qweight"][1, 0]) == 0xFEDCBA98 - (1 << 32)
    assert t["m.qzeros"].shape == (1, 1) and int(t["m.qzeros"][0, 0]) == 0x77777777  # v1: zero - 1 = 7
