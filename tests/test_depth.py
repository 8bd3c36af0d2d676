"""LLM-Drop: scores against known answers, real removal (no work, no cache), plans, patches, export, bad input."""

from __future__ import annotations

import pytest
import torch

from patchlm.depth import runtime
from patchlm.depth.drop import (
    DropKind,
    consecutive,
    drop_patch,
    effective,
    export_hf,
    joint,
    kv_cache_bytes,
    make_plan,
    one_shot,
    top_similar,
    validate_plan,
)
from patchlm.depth.scores import calibration_blocks, similarity_scores, span_similarity
from patchlm.errors import BaseMismatchError, ConfigError, PatchlmError
from patchlm.patch import Patch

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 23, 11, 64, 8, 3],
                    [900, 4, 77, 12, 610, 2, 45, 33, 89, 120, 6, 250]])


def _blocks(tok=None, n=4, t=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 2000, (n, t), generator=g)


def greedy_cached(model, ids, steps):
    """Greedy decoding with the KV cache (prefill, then one token at a time)."""
    out = model(input_ids=ids, use_cache=True)
    cache, toks, logits = out.past_key_values, [], [out.logits[:, -1]]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        toks.append(nxt)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(toks, 1), torch.stack(logits, 1), cache


def greedy_reforward(model, ids, steps):
    """Reference: re-run the whole sequence without a cache for every new token."""
    toks, logits = [], []
    cur = ids
    for _ in range(steps + 1):
        lg = model(input_ids=cur, use_cache=False).logits[:, -1]
        logits.append(lg)
        nxt = lg.argmax(-1, keepdim=True)
        toks.append(nxt)
        cur = torch.cat([cur, nxt], 1)
    return torch.cat(toks[:-1], 1), torch.stack(logits, 1)


def _layers(base):
    return base.model.model.layers


# ---------------------------------------------------------------- scores
def test_scores_known_answers(tiny):
    L = _layers(tiny)
    with torch.no_grad():
        L[1].self_attn.o_proj.weight.zero_()   # attention of layer 1 adds nothing
        L[2].mlp.down_proj.weight.zero_()      # MLP of layer 2 adds nothing
    sc = similarity_scores(tiny.model, _blocks())
    assert set(sc) == {"attention", "mlp", "block"} and all(len(v) == 4 for v in sc.values())
    assert sc["attention"][1] == pytest.approx(1.0, abs=1e-6)
    assert sc["mlp"][2] == pytest.approx(1.0, abs=1e-6)
    # with a zero attention the block is just the MLP: same similarity; with a zero MLP, just the attention
    assert sc["block"][1] == pytest.approx(sc["mlp"][1], abs=1e-6)
    assert sc["block"][2] == pytest.approx(sc["attention"][2], abs=1e-6)
    others = [sc["attention"][i] for i in (0, 2, 3)] + [sc["mlp"][i] for i in (0, 1, 3)]
    assert max(others) < 0.999


def test_scores_match_hidden_states(tiny):
    """Block similarity = mean cos(h_i, h_{i+1}) over tokens, h from output_hidden_states (independent path)."""
    blocks = _blocks()
    sc = similarity_scores(tiny.model, blocks)
    with torch.no_grad():
        hs = tiny.model(input_ids=blocks, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry is after the final norm in transformers 5: check the inner layers
        want = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert sc["block"][i] == pytest.approx(want, abs=1e-5)
    span = span_similarity(tiny.model, blocks, 2)
    want = torch.nn.functional.cosine_similarity(hs[1], hs[3], dim=-1).mean().item()
    assert len(span) == 3 and span[1] == pytest.approx(want, abs=1e-5)


def test_dropped_module_scores_one(tiny):
    runtime.apply_drops(tiny.model, [2], [1])
    sc = similarity_scores(tiny.model, _blocks())
    assert sc["attention"][2] == pytest.approx(1.0, abs=1e-6)
    assert sc["mlp"][1] == pytest.approx(1.0, abs=1e-6)


def test_calibration_blocks_real_text(tiny):
    b = calibration_blocks(tiny.tokenizer, "news_corpus", samples=3, seq_len=16)
    assert b.shape == (3, 16) and b.dtype == torch.long


# ---------------------------------------------------------------- real removal
def test_dropping_nothing_is_exact(tiny):
    ref = tiny.model(input_ids=IDS).logits
    DropKind().attach(tiny.model, {"attention": [], "mlp": [], "block": []})
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)
    DropKind().attach(tiny.model, {"attention": [1, 3], "mlp": [2], "block": [0]})
    assert not torch.allclose(tiny.model(input_ids=IDS).logits, ref)
    DropKind().detach(tiny.model)
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)
    assert type(_layers(tiny)[1]).__name__ == "LlamaDecoderLayer"
    assert [layer.self_attn.layer_idx for layer in _layers(tiny)] == [0, 1, 2, 3]


def test_drop_equals_zeroed_module(tiny):
    """Dropping a sub-layer = that sub-layer adding exactly zero (closed form)."""
    runtime.apply_drops(tiny.model, [1], [3])
    got = tiny.model(input_ids=IDS).logits
    runtime.restore_drops(tiny.model)
    L = _layers(tiny)
    with torch.no_grad():
        L[1].self_attn.o_proj.weight.zero_()
        L[3].mlp.down_proj.weight.zero_()
    assert torch.allclose(got, tiny.model(input_ids=IDS).logits, atol=1e-5)


def test_dropped_attention_does_no_work_and_keeps_no_cache(tiny):
    calls = {i: 0 for i in range(4)}
    for i, layer in enumerate(_layers(tiny)):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    full = tiny.model(input_ids=IDS, use_cache=True).past_key_values
    full_bytes = kv_cache_bytes(full)
    calls = {i: 0 for i in range(4)}
    runtime.apply_drops(tiny.model, [1, 2], [])
    out = tiny.model(input_ids=IDS, use_cache=True)
    assert calls == {0: 1, 1: 0, 2: 0, 3: 1}
    init = [c.is_initialized for c in out.past_key_values.layers]
    assert sum(init) == 2 and init[:2] == [True, True]  # renumbered: cache layers 0 and 1 only
    assert kv_cache_bytes(out.past_key_values) * 2 == full_bytes
    names = dict(tiny.model.named_modules())
    assert "model.layers.1.self_attn" not in names and "model.layers.1.mlp" in names


def test_generation_with_drops_matches_reference(tiny):
    runtime.apply_drops(tiny.model, [1, 2], [0])
    toks, logits, cache = greedy_cached(tiny.model, IDS, 6)
    ref_toks, ref_logits = greedy_reforward(tiny.model, IDS, 6)
    assert torch.equal(toks, ref_toks)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert cache.get_seq_length() == IDS.shape[1] + 6
    gen = tiny.model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[0, IDS.shape[1]:], toks[0])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_shaped_families(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=2100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, architectures=[model_cls.__name__])
    model = model_cls(cfg).eval()
    ref = model(input_ids=IDS).logits
    runtime.apply_drops(model, [], [])
    assert torch.equal(model(input_ids=IDS).logits, ref)
    runtime.apply_drops(model, [1], [])
    got = model(input_ids=IDS).logits
    toks, _, _ = greedy_cached(model, IDS, 4)
    assert torch.equal(toks, greedy_reforward(model, IDS, 4)[0])
    runtime.restore_drops(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    assert torch.allclose(got, model(input_ids=IDS).logits, atol=1e-5)


# ---------------------------------------------------------------- plans
def test_plan_functions_closed_form():
    sc = {"attention": [0.5, 0.9, 0.95, 0.7], "mlp": [0.6, 0.92, 0.8, 0.99], "block": [0.3, 0.85, 0.9, 0.6]}
    assert top_similar([0.1, 0.5, 0.5, 0.2], 1) == [2]  # ties: the later layer
    assert one_shot(sc, attn=2, mlp=1, blocks=1) == {"attention": [1, 2], "mlp": [3], "block": [2]}
    assert joint(sc, 3) == {"attention": [2], "mlp": [1, 3], "block": []}
    assert consecutive([0.2, 0.7, 0.4], 2) == {"attention": [], "mlp": [], "block": [1, 2]}
    assert effective({"attention": [1], "mlp": [2], "block": [3]}) == ([1, 3], [2, 3])


def test_iterative_rescores_and_restores(tiny):
    ref = tiny.model(input_ids=IDS).logits
    blocks = _blocks()
    plan, scores = make_plan(tiny.model, blocks, "iterative", attn=2)
    first = top_similar(scores["attention"], 1)[0]
    assert first in plan["attention"] and len(plan["attention"]) == 2
    # the second pick is the best attention after dropping the first one (re-scored)
    runtime.apply_drops(tiny.model, [first], [])
    rescored = similarity_scores(tiny.model, blocks)
    runtime.restore_drops(tiny.model)
    assert top_similar(rescored["attention"], 1, exclude={first}) == [a for a in plan["attention"] if a != first]
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)  # model left as it was


def test_drop_patch_roundtrip(tiny, tmp_path):
    plan, scores = make_plan(tiny.model, _blocks(), "joint", modules=3)
    p = drop_patch(tiny, plan, scores, "joint", {"task": "synthetic"})
    p.save(tmp_path / "d")
    q = Patch.load(tmp_path / "d")
    assert q.kind == "drop" and q.trainable_params == 0
    assert {t: q.spec[t] for t in ("attention", "mlp", "block")} == plan
    assert torch.equal(q.tensors["scores.attention"], torch.tensor(scores["attention"]))
    p.apply(tiny)
    a = tiny.model(input_ids=IDS).logits
    runtime.restore_drops(tiny.model)
    q.apply(tiny)
    assert torch.equal(tiny.model(input_ids=IDS).logits, a)


def test_export_hf_block_drop(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    export_hf(tiny.model, tiny.tokenizer, [1, 2], tmp_path / "hf")
    runtime.apply_drops(tiny.model, [1, 2], [1, 2])
    want = tiny.model(input_ids=IDS).logits
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert m.config.num_hidden_layers == 2 and len(m.model.layers) == 2
    assert torch.allclose(m(input_ids=IDS).logits, want, atol=1e-5)
    with pytest.raises(ConfigError, match="without runtime drops"):
        export_hf(tiny.model, None, [3], tmp_path / "hf2")
    with pytest.raises(PatchlmError, match="already exists"):
        export_hf(tiny.model, None, [3], tmp_path / "hf")


def test_drop_kind_is_a_depth_stage_and_attach_returns_the_resolved_spec(tiny):
    from patchlm.patch import get_kind, stack_order

    assert get_kind("drop").stage == "depth" and get_kind("router").stage == "depth"
    spec = {"attention": [2, 1, 2], "method": "one-shot"}
    given = {k: list(v) if isinstance(v, list) else v for k, v in spec.items()}
    resolved = DropKind().attach(tiny.model, spec)
    assert spec == given  # the caller's dict is not changed
    assert resolved == {"attention": [1, 2], "mlp": [], "block": [], "method": "one-shot", "num_layers": 4}
    assert runtime.dropped(tiny.model) == ([1, 2], [])
    kinds = ["router", "drop", "lora", "drop", "lora"]
    patches = [Patch(kind=k, base={}, spec={"i": i}, tensors={}) for i, k in enumerate(kinds)]
    assert [(p.kind, p.spec["i"]) for p in stack_order(patches)] == [("lora", 2), ("lora", 4), ("router", 0),
                                                                    ("drop", 1), ("drop", 3)]


def test_save_hf_checkpoint_writes_plain_models_only(tiny, tmp_path):
    """The shared writer refuses a model still carrying patch modules (routers, unbaked LoRA, runtime drops)
    and leaves nothing behind; a baked model round-trips to the same logits."""
    from transformers import AutoModelForCausalLM

    from patchlm.adapters.lora import LoraKind, bake_lora
    from patchlm.depth.skip import RouterKind
    from patchlm.models.export import save_hf_checkpoint

    RouterKind().attach(tiny.model, {"layers": [2]})
    with pytest.raises(ConfigError, match=r"extra weights.*router"):
        save_hf_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "r")
    RouterKind().detach(tiny.model)
    runtime.apply_drops(tiny.model, [], [1])
    with pytest.raises(ConfigError, match=r"missing weights.*layers\.1"):
        save_hf_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "d")
    runtime.restore_drops(tiny.model)
    kind = LoraKind()
    kind.attach(tiny.model, {"r": 2, "alpha": 4, "targets": "all-linear"}, seed=0)
    with torch.no_grad():
        for p in kind.trainable_parameters(tiny.model):
            p.normal_(0, 0.2)
    want = tiny.model(input_ids=IDS).logits
    with pytest.raises(ConfigError, match="not a plain LlamaForCausalLM"):
        save_hf_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "l")
    assert not any(tmp_path.iterdir())
    bake_lora(tiny.model)
    save_hf_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "l")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "l").eval()
    assert torch.allclose(m(input_ids=IDS).logits, want, atol=1e-5)
    assert (tmp_path / "l" / "tokenizer_config.json").exists()
    with pytest.raises(PatchlmError, match="already exists"):
        save_hf_checkpoint(tiny.model, tiny.tokenizer, tmp_path / "l")


# ---------------------------------------------------------------- bad input
def test_bad_indices_and_dropping_everything(tiny):
    ref = tiny.model(input_ids=IDS).logits
    with pytest.raises(ConfigError, match=r"out of range.*4 layers"):
        DropKind().attach(tiny.model, {"attention": [4]})
    with pytest.raises(ConfigError, match="every layer"):
        DropKind().attach(tiny.model, {"block": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="all 4 attention"):
        DropKind().attach(tiny.model, {"attention": [0, 1, 2, 3]})
    with pytest.raises(ConfigError, match="out of range"):
        validate_plan({"mlp": [-1]}, 4)
    with pytest.raises(ConfigError, match="attn 9") as e:  # the library names the config field
        make_plan(tiny.model, _blocks(), attn=9)
    assert e.value.field == "attn"
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)  # nothing changed


def test_patch_for_another_base_or_architecture(tiny):
    p = drop_patch(tiny, {"attention": [1]}, {"attention": [0.0] * 4}, "one-shot", {})
    p.base = {**p.base, "fingerprint": "blake2b:other"}
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        p.apply(tiny)
    p.base = {**p.base, "architecture": "Gemma3ForCausalLM"}
    with pytest.raises(BaseMismatchError, match="Gemma3ForCausalLM"):
        p.apply(tiny)
    bad_depth = drop_patch(tiny, {"attention": [1]}, {}, "one-shot", {})
    bad_depth.spec["num_layers"] = 30
    with pytest.raises(PatchlmError, match="30 layers"):
        bad_depth.apply(tiny)
    assert runtime.dropped(tiny.model) == ([], [])


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from patchlm.depth.arch import UnsupportedModelError

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedModelError, match="not supported for GPT2LMHeadModel; supported: LlamaForCausalLM"):
        runtime.apply_drops(m, [0], [])
    with pytest.raises(UnsupportedModelError, match="scoring is not supported for GPT2LMHeadModel"):
        similarity_scores(m, torch.zeros(1, 4, dtype=torch.long))


def test_gemma3_scores_but_refuses_dropping():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from patchlm.depth.arch import UnsupportedModelError

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           architectures=["Gemma3ForCausalLM"])
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.zero_()
    sc = similarity_scores(m, torch.randint(0, 300, (2, 10)))
    assert sc["attention"][0] == pytest.approx(1.0, abs=1e-6) and sc["attention"][1] < 0.999
    with pytest.raises(UnsupportedModelError, match="dropping is not supported for Gemma3ForCausalLM"):
        runtime.apply_drops(m, [1], [])
