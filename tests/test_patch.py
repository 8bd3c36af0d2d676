import json

import pytest
import torch

from patchlm.errors import BaseMismatchError, OutputExistsError, PatchFormatError, UnknownNameError
from patchlm.patch import Patch, get_kind, kinds


def _lora_patch(base, r=2, seed=0):
    kind = get_kind("lora")
    kind.attach(base.model, {"r": r, "alpha": 4, "targets": "attn"}, seed=seed)
    for name, p in base.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    tensors = kind.state(base.model)
    kind.detach(base.model)
    targets = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return Patch(kind="lora", base=base.ref(), spec={"r": r, "alpha": 4, "targets": targets},
                 tensors=tensors)


def test_save_load_roundtrip(tiny, tmp_path):
    p = _lora_patch(tiny)
    p.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert meta["kind"] == "lora" and meta["base"]["fingerprint"] == tiny.fingerprint
    assert meta["trainable_params"] == sum(t.numel() for t in p.tensors.values())
    q = Patch.load(tmp_path / "p")
    assert set(q.tensors) == set(p.tensors)
    assert all(torch.equal(q.tensors[k], p.tensors[k]) for k in p.tensors)
    assert q.info()["file_bytes"] > 0


def test_existing_output_needs_force(tiny, tmp_path):
    p = _lora_patch(tiny)
    p.save(tmp_path / "p")
    with pytest.raises(OutputExistsError):
        p.save(tmp_path / "p")
    p.save(tmp_path / "p", force=True)


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    p = _lora_patch(tiny)
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        p.save(tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_truncated_tensors_are_refused(tiny, tmp_path):
    _lora_patch(tiny).save(tmp_path / "p")
    f = tmp_path / "p" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PatchFormatError, match="truncated or corrupt"):
        Patch.load(tmp_path / "p")


def test_missing_files_and_unknown_kind(tiny, tmp_path):
    _lora_patch(tiny).save(tmp_path / "p")
    with pytest.raises(PatchFormatError, match="no patch"):
        Patch.load(tmp_path / "nope")
    meta = tmp_path / "p" / "patch.json"
    d = json.loads(meta.read_text())
    d["kind"] = "lorax"
    meta.write_text(json.dumps(d))
    with pytest.raises(UnknownNameError, match="lora"):
        Patch.load(tmp_path / "p")
    meta.unlink()
    with pytest.raises(PatchFormatError, match=r"missing patch\.json"):
        Patch.load(tmp_path / "p")


def test_patch_for_another_base_is_refused(tiny, tmp_path):
    p = _lora_patch(tiny)
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    tiny.model.save_pretrained(tmp_path / "other")
    tiny.tokenizer.save_pretrained(tmp_path / "other")
    from patchlm.models import load_base

    other = load_base(str(tmp_path / "other"))
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        p.apply(other)
    p.apply(other, force=True)  # explicit override works


def test_registry_has_lora():
    assert "lora" in kinds()
