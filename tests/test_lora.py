import json

import pytest
import torch

from patchlm.adapters import resolve_targets
from patchlm.adapters.lora import LoraLinear, merge_lora, unmerge_lora
from patchlm.adapters.peft_io import export_peft, import_peft
from patchlm.errors import UnknownNameError
from patchlm.patch import Patch, get_kind


def _ids():
    return torch.tensor([[5, 17, 300, 4000, 12, 9, 77, 31]])


def _randomize(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_presets_and_names(tiny):
    m = tiny.model
    attn = resolve_targets(m, "attn")
    assert len(attn) == 4 * 4 and all(n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in attn)
    assert len(resolve_targets(m, "mlp")) == 12
    assert len(resolve_targets(m, "all-linear")) == 28  # lm_head excluded
    assert resolve_targets(m, "q_proj,v_proj") == resolve_targets(m, "qv")
    assert resolve_targets(m, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(UnknownNameError, match="q_proj"):
        resolve_targets(m, "q_prj")


def test_fresh_lora_is_identity_and_counts(tiny):
    ref = tiny.model(_ids()).logits
    kind = get_kind("lora")
    kind.attach(tiny.model, {"r": 4, "alpha": 8, "targets": "all-linear"})
    assert torch.allclose(tiny.model(_ids()).logits, ref)
    expected = sum(4 * (m.base.in_features + m.base.out_features)
                   for m in tiny.model.modules() if isinstance(m, LoraLinear))
    assert sum(p.numel() for p in kind.trainable_parameters(tiny.model)) == expected
    assert all(not p.requires_grad for n, p in tiny.model.named_parameters() if "lora_" not in n)


def test_merge_unmerge_exact(tiny):
    kind = get_kind("lora")
    kind.attach(tiny.model, {"r": 4, "alpha": 8, "targets": "all-linear"})
    _randomize(tiny.model)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters() if "base.weight" in n}
    unmerged = tiny.model(_ids()).logits
    merge_lora(tiny.model)
    merged = tiny.model(_ids()).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    changed = any(not torch.equal(p, before[n]) for n, p in tiny.model.named_parameters() if n in before)
    assert changed
    unmerge_lora(tiny.model)
    for n, p in tiny.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    kind.detach(tiny.model)
    assert not any(isinstance(m, LoraLinear) for m in tiny.model.modules())


def test_peft_roundtrip_same_logits(tiny, tmp_path):
    from peft import PeftModel

    kind = get_kind("lora")
    kind.attach(tiny.model, {"r": 4, "alpha": 16, "targets": "attn"})
    _randomize(tiny.model)
    ours = tiny.model(_ids()).logits.detach()
    patch = Patch(kind="lora", base=tiny.ref(), spec={"r": 4, "alpha": 16, "targets": []},
                  tensors=kind.state(tiny.model))
    kind.detach(tiny.model)
    export_peft(patch, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    from patchlm.models import load_base

    fresh = load_base("tiny-random-llama")
    peft_model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "peft"))
    theirs = peft_model(_ids()).logits.detach()
    assert (theirs - ours).abs().max() < 1e-5
    back = import_peft(tmp_path / "peft", base=tiny)
    assert set(back.tensors) == set(patch.tensors)
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)


def test_peft_mixed_ranks_use_rank_pattern(tiny, tmp_path):
    from peft import PeftModel

    kind = get_kind("lora")
    kind.attach(tiny.model, {"r": 2, "alpha": 4, "targets": "qv"})
    _randomize(tiny.model)
    tensors = kind.state(tiny.model)
    kind.detach(tiny.model)
    # widen one module to rank 3 (e.g. a stacked federated adapter)
    n = "model.layers.0.self_attn.q_proj"
    tensors[f"{n}.lora_A"] = torch.cat([tensors[f"{n}.lora_A"], torch.randn(1, 64) * 0.1])
    tensors[f"{n}.lora_B"] = torch.cat([tensors[f"{n}.lora_B"], torch.randn(64, 1) * 0.1], 1)
    patch = Patch(kind="lora", base=tiny.ref(), spec={"r": 2, "alpha": 4}, tensors=tensors)
    patch.apply(tiny)
    ours = tiny.model(_ids()).logits.detach()
    export_peft(patch, tmp_path / "peft")
    from patchlm.models import load_base

    peft_model = PeftModel.from_pretrained(load_base("tiny-random-llama").model, str(tmp_path / "peft"))
    assert (peft_model(_ids()).logits - ours).abs().max() < 1e-5


def test_peft_alpha_pattern_imports_with_equal_logits(tiny, tmp_path):
    """A PEFT adapter whose modules scale differently (alpha_pattern) imports into one scaling, B folded."""
    from conftest import randomize, sample_ids
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from patchlm.models import load_base

    pm = get_peft_model(load_base("tiny-random-llama").model,
                        PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       alpha_pattern={"v_proj": 12}, lora_dropout=0.0))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n], std=0.1)
    pm.eval()
    with torch.no_grad():
        theirs = pm(sample_ids()).logits
    pm.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["alpha_pattern"] == {"v_proj": 12}
    raw = {k: v for k, v in pm.named_parameters() if "lora_B" in k}
    patch = import_peft(tmp_path / "peft", base=tiny)
    assert "scaling" not in patch.spec and patch.spec["alpha"] == 4.0  # one scaling, alpha / r = 2
    v = "model.layers.0.self_attn.v_proj"
    peft_b = next(t for k, t in raw.items() if f"{v}.lora_B" in k).detach()
    assert torch.allclose(patch.tensors[f"{v}.lora_B"], peft_b * 3)  # (12/2) / (4/2): folded into B
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(patch.tensors[f"{q}.lora_B"], next(t for k, t in raw.items() if f"{q}.lora_B" in k).detach())
    patch.apply(tiny)
    with torch.no_grad():
        ours = tiny.model(sample_ids()).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_one_alpha_default_and_resolved_spec(tiny):
    """alpha unset means 2 x r (as the CLI); attach returns the resolved spec and leaves the caller's dict alone."""
    from patchlm.adapters import LoraConfig
    from patchlm.errors import ConfigError
    from patchlm.patch import kind_can

    assert LoraConfig().alpha is None and LoraConfig(r=8).lora_alpha == 16.0
    given = {"r": 8, "targets": "qv"}
    spec = get_kind("lora").attach(tiny.model, given, seed=0)
    assert given == {"r": 8, "targets": "qv"}
    assert spec["alpha"] == 16.0 and spec["dropout"] == 0.0 and len(spec["targets"]) == 8
    assert all(m.scaling == 2.0 for m in tiny.model.modules() if isinstance(m, LoraLinear))
    get_kind("lora").detach(tiny.model)
    with pytest.raises(ConfigError, match="unknown lora spec key 'rank'"):
        get_kind("lora").attach(tiny.model, {"rank": 8}, seed=0)
    with pytest.raises(ConfigError, match="rank r must be positive"):
        LoraConfig(r=0)
    assert kind_can("lora", "export-peft") and not kind_can("lora", "materialize")
    assert kind_can("mos", "materialize") and get_kind("mos").stage == "weight"
