"""PortLLM: porting onto an identical base is exactly the original patched model; onto an evolved base it is
theta' + dW; unrelated bases are refused naming both fingerprints unless forced; other shapes always."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_merge_patches import lora_patch

from patchlm.errors import BaseMismatchError
from patchlm.merge.port import port_patch
from patchlm.models import load_base
from patchlm.patch import Patch, get_kind

IDS = torch.tensor([[5, 9, 2, 6, 5, 3]])


def _copy(src: Path, dest: Path, fn) -> Path:
    shutil.copytree(src, dest)
    (dest / "patchlm.json").unlink(missing_ok=True)
    f = dest / "model.safetensors"
    sd = load_file(str(f))
    save_file(fn(sd), str(f), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    src = Path(load_base("tiny-random-llama").path)
    g = torch.Generator().manual_seed(7)
    evolved = _copy(src, root / "evolved", lambda sd: {k: v + 0.005 * torch.randn(v.shape, generator=g)
                                                       for k, v in sd.items()})
    unrelated = _copy(src, root / "unrelated", lambda sd: {k: torch.randn(v.shape, generator=g) * 0.05
                                                           for k, v in sd.items()})
    return {"evolved": str(evolved), "unrelated": str(unrelated), "root": root}


def test_port_to_identical_base_is_exactly_the_patched_model(tiny, tmp_path):
    patch = lora_patch(tiny, 1)
    patch.save(tmp_path / "p")
    patch = Patch.load(tmp_path / "p")
    patch.apply(tiny)
    want = tiny.model(IDS).logits
    fresh = load_base("tiny-random-llama")
    ported, report = port_patch(patch, fresh)
    assert report["identical_base"] and ported.base["fingerprint"] == tiny.fingerprint
    ported.save(tmp_path / "ported")
    Patch.load(tmp_path / "ported").apply(fresh)
    assert torch.equal(fresh.model(IDS).logits, want)


def test_port_to_evolved_base(tiny, bases, tmp_path):
    patch = lora_patch(tiny, 1)
    new = load_base(bases["evolved"])
    ported, report = port_patch(patch, new)
    assert not report["identical_base"] and report["similarity"] > 0.9
    prov = ported.provenance["ported"]
    assert prov["old_fingerprint"] == tiny.fingerprint and prov["new_fingerprint"] == new.fingerprint
    assert ported.base["fingerprint"] == new.fingerprint
    with pytest.raises(BaseMismatchError):
        patch.apply(new)  # the original patch is still bound to its base
    name = "model.layers.1.self_attn.q_proj"
    w_new = new.model.get_submodule(name).weight.detach().clone()
    ported.apply(new)
    from patchlm.adapters.lora import merge_lora

    merge_lora(new.model)
    a, b = patch.tensors[f"{name}.lora_A"], patch.tensors[f"{name}.lora_B"]
    assert torch.allclose(new.model.get_submodule(name).base.weight, w_new + (b @ a) * 2.0, atol=1e-6)
    get_kind("lora").detach(new.model)


def test_unrelated_base_refused_naming_both_fingerprints(tiny, bases):
    patch = lora_patch(tiny, 1)
    new = load_base(bases["unrelated"])
    with pytest.raises(BaseMismatchError) as e:
        port_patch(patch, new)
    assert tiny.fingerprint in str(e.value) and new.fingerprint in str(e.value) and "--force" in str(e.value)
    ported, report = port_patch(patch, new, force=True)
    assert report["forced"] and ported.provenance["ported"]["forced"]


def test_other_architecture_refused_even_forced(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=tiny.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "small")
    tiny.tokenizer.save_pretrained(tmp_path / "small")
    small = load_base(str(tmp_path / "small"))
    with pytest.raises(BaseMismatchError, match="does not fit"):
        port_patch(lora_patch(tiny, 1), small, force=True)
    # nothing left attached on the refused base
    assert not any("lora" in n for n, _ in small.model.named_parameters())


def test_cli_port(tiny, bases, tmp_path, capsys):
    lora_patch(tiny, 1).save(tmp_path / "p")
    code, out, err = run_cli(["port", str(tmp_path / "p"), "--to", bases["evolved"], "--out", str(tmp_path / "q"),
                              "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["similarity"] > 0.9 and Patch.load(tmp_path / "q").base["fingerprint"] == rep["new_fingerprint"]
    code, out, err = run_cli(["port", str(tmp_path / "p"), "--to", bases["unrelated"], "--out", str(tmp_path / "r")],
                             capsys)
    assert code == 2 and "fingerprint" in err and not (tmp_path / "r").exists()


def test_streamed_inspection_matches_loading(bases, tmp_path):
    from patchlm.merge.port import inspect_base

    for ref in ("tiny-random-llama", bases["evolved"]):
        info = inspect_base(ref)
        loaded = load_base(ref)
        assert info.fingerprint == loaded.fingerprint and info.architecture == loaded.architecture
        assert next(info.model.parameters()).device.type == "meta"  # no weights were loaded


def test_port_by_reference_without_loading(tiny, bases):
    patch = lora_patch(tiny, 1)
    ported, report = port_patch(patch, bases["evolved"])
    assert ported.base["fingerprint"] == load_base(bases["evolved"]).fingerprint and report["similarity"] > 0.9


def test_streamed_fingerprint_in_small_chunks(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchlm.models.checkpoint import Checkpoint
    from patchlm.models.fingerprint import fingerprint_checkpoint

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny.path))
    assert fingerprint_checkpoint(Checkpoint(str(Path(tiny.path))), meta, chunk_elements=1000) == tiny.fingerprint
