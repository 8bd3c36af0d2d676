"""VeRA and VB-LoRA as patch kinds (PEFT does the math): train, save, load, materialize to an exact LoRA, and the
same numbers as the benchmark's former bench-only kinds."""

import json
from typing import ClassVar

import pytest
import torch
from conftest import randomize, run_cli, sample_ids

from patchlm.errors import ConfigError
from patchlm.patch import Patch, PatchKind, get_kind, kind_can, register_kind, stack_order

# tiny-random-llama: hidden 64, k/v out 32, mlp 128, 4 layers -> vector_length must divide 32
SPECS = {"vera": {"r": 8, "d_initial": 0.1}, "vblora": {"r": 4, "vector_length": 16, "num_vectors": 8, "topk": 2}}


@pytest.mark.parametrize("name", ["vera", "vblora"])
def test_kind_attach_save_load_materialize(tiny, tmp_path, name):
    from patchlm.adapters.peft_io import to_lora_patch
    from patchlm.models import load_base

    assert kind_can(name, "materialize") and get_kind(name).stage == "weight"
    ref = tiny.model(sample_ids()).logits.detach()
    kind = get_kind(name)
    given = dict(SPECS[name])
    spec = kind.attach(tiny.model, given, seed=3)
    assert given == SPECS[name]  # attach does not change the caller's dict
    assert len(spec["targets"]) == 28 and spec["dropout"] == 0.0
    if name == "vera":  # b starts at zero: a fresh VeRA is the identity (VB-LoRA starts from random logits)
        assert torch.allclose(tiny.model(sample_ids()).logits, ref, atol=1e-6)
    params = kind.trainable_parameters(tiny.model)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.numel() for p in tiny.model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    randomize(params, std=0.2)
    ours = tiny.model(sample_ids()).logits.detach()
    patch = Patch(kind=name, base=tiny.ref(), spec={**spec, "seed": 3}, tensors=kind.state(tiny.model))
    assert patch.trainable_params == sum(p.numel() for p in params)
    kind.detach(tiny.model)
    assert torch.equal(tiny.model(sample_ids()).logits, ref)  # detach restores the base
    assert not hasattr(tiny.model, "peft_config")
    patch.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    fresh = load_base("tiny-random-llama")
    loaded.apply(fresh)
    assert torch.equal(fresh.model(sample_ids()).logits, ours)
    lora = to_lora_patch(loaded)
    assert lora.kind == "lora" and lora.spec["scaling"] == 1.0 and len(lora.tensors) == 2 * 28
    other = load_base("tiny-random-llama")
    lora.apply(other)
    assert (other.model(sample_ids()).logits - ours).abs().max() < 1e-5
    info = loaded.info()
    assert info["num_modules"] == 28 and info["rank"] == SPECS[name]["r"]


def test_vera_materialized_matrices_by_hand(tiny):
    """VeRA dW = diag(b) B diag(d) A: the materialized LoRA's B A is PEFT's own delta weight."""
    kind = get_kind("vera")
    spec = kind.attach(tiny.model, {"r": 8}, seed=5)
    randomize(kind.trainable_parameters(tiny.model), std=0.3)
    layers = kind.layers(tiny.model)
    patch = Patch(kind="vera", base=tiny.ref(), spec={**spec, "seed": 5}, tensors=kind.state(tiny.model))
    lora = kind.materialize(patch)
    for n, m in layers.items():
        want = m.get_delta_weight("default")
        got = lora.tensors[f"{n}.lora_B"] @ lora.tensors[f"{n}.lora_A"]
        assert torch.allclose(got, want, atol=1e-6), n


def test_bad_specs_are_refused(tiny):
    ref = tiny.model(sample_ids()).logits
    with pytest.raises(ConfigError, match="vector_length=64 does not divide"):
        get_kind("vblora").attach(tiny.model, {"r": 4}, seed=0)  # the default 64 does not divide 32
    with pytest.raises(ConfigError, match="unknown vera spec key 'rank'"):
        get_kind("vera").attach(tiny.model, {"rank": 4}, seed=0)
    with pytest.raises(ConfigError, match="topk=9 exceeds num_vectors=8"):
        get_kind("vblora").attach(tiny.model, {**SPECS["vblora"], "topk": 9}, seed=0)
    assert torch.equal(tiny.model(sample_ids()).logits, ref)


def test_stack_order_puts_weight_kinds_first():
    class P:
        def __init__(self, kind):
            self.kind = kind

    ps = [P("drop"), P("vera"), P("router"), P("lora"), P("vblora")]
    assert [p.kind for p in stack_order(ps)] == ["vera", "lora", "vblora", "drop", "router"]


# ---------------------------------------------------------------- the former bench-only kinds, as a reference
# copied from `git show af73a9d:bench/adapters.py` (LEAVES = the tiny model's linear leaves, as there)
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _RefPeftKind(PatchKind):
    _models: ClassVar[dict[int, object]] = {}

    def config(self, spec):
        raise NotImplementedError

    def attach(self, model, spec, tensors=None, seed=0):
        from peft import get_peft_model

        torch.manual_seed(seed)
        pm = get_peft_model(model, self.config(spec))
        self._models[id(model)] = pm
        for n, p in model.named_parameters():
            p.requires_grad_(self._is_adapter(n))
        if tensors is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, t in tensors.items():
                    params[k].copy_(t)

    @staticmethod
    def _is_adapter(name):
        return any(s in name for s in ("vera_lambda", "vblora_logits", "vblora_vector_bank"))

    def detach(self, model):
        pm = self._models.pop(id(model), None)
        if pm is not None:
            pm.unload()

    def state(self, model):
        return {n: p.detach().to("cpu", torch.float32, copy=True).contiguous()
                for n, p in model.named_parameters() if self._is_adapter(n)}

    def trainable_parameters(self, model):
        return [p for n, p in model.named_parameters() if self._is_adapter(n)]


@register_kind("ref-peft-vera")
class _RefVera(_RefPeftKind):
    def config(self, spec):
        from peft import VeraConfig

        return VeraConfig(r=spec["r"], d_initial=spec.get("d_initial", 0.1), target_modules=LEAVES,
                          save_projection=False, projection_prng_key=int(spec.get("seed", 0)))


@register_kind("ref-peft-vblora")
class _RefVBLora(_RefPeftKind):
    def config(self, spec):
        from peft import VBLoRAConfig

        return VBLoRAConfig(r=spec["r"], vector_length=spec["vector_length"], num_vectors=spec["num_vectors"],
                            topk=spec["topk"], target_modules=LEAVES)


def _new_name(ref_name: str) -> str:
    """The former kinds' PEFT parameter names -> the kinds' names (module.tensor; the bank once)."""
    stem = ref_name.removesuffix(".default")
    return "vblora.vector_bank" if stem.endswith("vblora_vector_bank") else stem


@pytest.mark.parametrize("name", ["vera", "vblora"])
def test_kinds_train_the_numbers_the_bench_kinds_trained(toy_task, name):
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-2, warmup=0.1, bf16=True, progress=False, eval_limit=8, seed=1)
    old = Trainer(load_base("tiny-random-llama"), f"ref-peft-{name}", dict(SPECS[name]), toy_task, cfg).run()
    new = Trainer(load_base("tiny-random-llama"), name, dict(SPECS[name]), toy_task, cfg).run()
    moved = {_new_name(k): v for k, v in old.tensors.items()}
    assert set(moved) == set(new.tensors)
    assert any(not torch.equal(moved[k], get_kind(name).state(_fresh(name))[k]) for k in moved)  # it trained
    for k, v in moved.items():
        assert torch.equal(v, new.tensors[k]), k
    assert old.metrics["val_accuracy"] == new.metrics["val_accuracy"]


def _fresh(name):
    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    get_kind(name).attach(base.model, dict(SPECS[name]), seed=1)
    return base.model


@pytest.mark.parametrize("name", ["vera", "vblora"])
def test_cli_trains_evaluates_shows_and_exports(tmp_path, capsys, name):
    flags = {"vera": ["--vera-r", "8"], "vblora": ["--vblora-vector-length", "16", "--vblora-num-vectors", "8"]}
    code, out, err = run_cli(["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--method", name, *flags[name],
                              "--steps", "2", "--batch-size", "2", "--max-examples", "40", "--eval-limit", "8", "-q",
                              "--out", str(tmp_path / "run"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == name and info["num_modules"] == 28
    patch = tmp_path / "run" / "patch"
    code, out, err = run_cli(["eval", "-m", "tiny-random-llama", "-t", "sms_spam", "-p", str(patch), "--limit", "8",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 8
    code, out, err = run_cli(["info", str(patch), "--json"], capsys)
    assert code == 0 and json.loads(out)["kind"] == name
    code, _, err = run_cli(["export", str(patch), "--format", "peft", "--out", str(tmp_path / "peft")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", str(patch), "--format", "merged", "--out", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    Patch.load(patch).apply(base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (merged(sample_ids()).logits - base.model(sample_ids()).logits).abs().max() < 1e-5
