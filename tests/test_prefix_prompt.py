"""Prefix tuning and prompt tuning as patch kinds: exact attach/detach, Patch round trip, first- and zeroth-order
training on the engine, PEFT's own PREFIX_TUNING / PROMPT_TUNING adapters loading the export with the same logits,
import back, and greedy generation equal to PEFT's."""

import warnings

import pytest
import torch
from conftest import killed_after, randomize, run_cli, sample_ids, toy_features

from patchlm.data.features import collate, pad_id
from patchlm.errors import ConfigError, PatchFormatError, PatchlmError
from patchlm.patch import Patch, get_kind, kind_can
from patchlm.train.engine import causal_lm_loss

KINDS = ["prefix", "prompt"]
N = 3


def _ids_mask():
    ids = sample_ids()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row, as collate makes them
    return ids, mask


@torch.no_grad()
def _logits(model, ids=None, mask=None):
    if ids is None:
        ids, mask = _ids_mask()
    model.eval()
    return model(input_ids=ids, attention_mask=mask).logits.detach().clone()


def _trained_patch(base, name, seed=0, std=0.3):
    """A patch of kind `name` whose tensors are not their init (so a wrong layout would show)."""
    kind = get_kind(name)
    spec = kind.attach(base.model, {"num_virtual_tokens": N}, seed=seed)
    randomize(kind.trainable_parameters(base.model), seed=seed + 1, std=std)
    return Patch(kind=name, base=base.ref(), spec=spec, tensors=kind.state(base.model))


def _peft_model(path):
    from peft import PeftModel

    from patchlm.models import load_base

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(load_base("tiny-random-llama").model, str(path))
    return pm.eval()


@pytest.mark.parametrize("name", KINDS)
def test_attach_detach_is_exact(tiny, name):
    model = tiny.model
    ref = _logits(model)
    kind = get_kind(name)
    assert kind.stage == "weight" and kind_can(name, "export-peft") and not kind_can(name, "materialize")
    given = {"num_virtual_tokens": N}
    spec = kind.attach(model, given, seed=0)
    assert given == {"num_virtual_tokens": N}  # the caller's dict is untouched
    assert spec["init"] == "vocab" and spec["seed"] == 0
    if name == "prefix":  # tiny-random-llama: 4 layers, 4 heads, 2 KV heads of dim 16 (grouped-query attention)
        assert (spec["num_layers"], spec["num_attention_heads"], spec["token_dim"]) == (4, 2, 32)
    else:
        assert spec["token_dim"] == 64
    params = kind.trainable_parameters(model)
    assert len(params) == 1 and params[0].requires_grad
    assert [p for p in model.parameters() if p.requires_grad] == params  # the base is frozen
    patched = _logits(model)
    assert patched.shape == ref.shape and not torch.allclose(patched, ref)
    with pytest.raises(PatchlmError, match="already has a"):
        kind.attach(model, {"num_virtual_tokens": N}, seed=0)
    kind.detach(model)
    assert torch.equal(_logits(model), ref)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert not any("patchlm" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", KINDS)
def test_every_forward_path_sees_the_virtual_tokens(tiny, name):
    """model(...), the backbone alone (the engine's loss path) and positional calls agree; lengths are the caller's."""
    model = tiny.model
    _trained_patch(tiny, name)
    ids, mask = _ids_mask()
    logits = _logits(model, ids, mask)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        positional = model.model(ids, mask).last_hidden_state
        with_pos = model.model(input_ids=ids, attention_mask=mask,
                               position_ids=torch.arange(ids.shape[1])[None]).last_hidden_state
    assert hidden.shape[:2] == ids.shape
    assert torch.equal(model.lm_head(hidden), logits)
    assert torch.equal(positional, hidden)
    assert torch.allclose(with_pos, hidden, atol=1e-6)  # caller's position ids: shifted (prefix) or dropped (prompt)


def test_vocab_init_is_the_sampled_tokens_themselves(tiny):
    """A "vocab" prefix holds the keys/values of n sampled tokens, a "vocab" prompt their embeddings: both give the
    logits of the base model reading those tokens first (the closed form of both inits)."""
    from patchlm.adapters.virtual import sample_token_ids

    model = tiny.model
    ids = sample_ids()
    virt = sample_token_ids(model, N, seed=7)
    with torch.no_grad():
        want = model(input_ids=torch.cat([virt.expand(ids.shape[0], -1), ids], 1)).logits[:, N:]
    for name in KINDS:
        kind = get_kind(name)
        kind.attach(model, {"num_virtual_tokens": N, "init": "vocab"}, seed=7)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert (got - want).abs().max() < 1e-5, name
        kind.detach(model)


@pytest.mark.parametrize("name", KINDS)
def test_save_load_round_trip(tiny, tmp_path, name):
    from patchlm.models import load_base

    patch = _trained_patch(tiny, name)
    ours = _logits(tiny.model)
    patch.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert loaded.kind == name and loaded.spec == patch.spec
    assert all(torch.equal(loaded.tensors[k], v) for k, v in patch.tensors.items())
    assert loaded.trainable_params == N * (4 * 2 * 32 if name == "prefix" else 64)
    assert loaded.info()["num_virtual_tokens"] == N
    fresh = load_base("tiny-random-llama")
    loaded.apply(fresh)
    assert torch.equal(_logits(fresh.model), ours)
    # the same seed gives the same init; another seed another one
    kind = get_kind(name)
    a, b = load_base("tiny-random-llama"), load_base("tiny-random-llama")
    kind.attach(a.model, {"num_virtual_tokens": N, "init": "random"}, seed=1)
    kind.attach(b.model, {"num_virtual_tokens": N, "init": "random"}, seed=1)
    assert torch.equal(kind.state(a.model)[next(iter(patch.tensors))], kind.state(b.model)[next(iter(patch.tensors))])


@pytest.mark.parametrize("name", KINDS)
def test_bad_specs_and_tensors_are_refused(tiny, name):
    kind = get_kind(name)
    ref = _logits(tiny.model)
    with pytest.raises(ConfigError, match="num_virtual_tokens must be positive") as e:
        kind.attach(tiny.model, {"num_virtual_tokens": 0}, seed=0)
    assert e.value.field == "num_virtual_tokens"
    with pytest.raises(ConfigError, match=f"unknown {name} init 'text'"):
        kind.attach(tiny.model, {"init": "text"}, seed=0)
    with pytest.raises(ConfigError, match=f"unknown {name} spec key 'r'"):
        kind.attach(tiny.model, {"r": 4}, seed=0)
    key = "prefix_embeddings" if name == "prefix" else "prompt_embeddings"
    with pytest.raises(PatchFormatError, match="patch made for another architecture"):
        kind.attach(tiny.model, {"num_virtual_tokens": N}, {key: torch.zeros(N, 7)}, seed=0)
    with pytest.raises(PatchFormatError, match="has no tensor"):
        kind.attach(tiny.model, {"num_virtual_tokens": N}, {}, seed=0)
    assert torch.equal(_logits(tiny.model), ref)  # nothing was left attached


def _mean_loss(base, task) -> float:
    feats = toy_features(base, task)
    batch = collate(feats, pad_id(base.tokenizer))
    base.model.eval()
    with torch.no_grad():
        return float(causal_lm_loss(base.model, batch)[0])


@pytest.mark.parametrize("name", KINDS)
def test_first_order_training_changes_the_tensors_and_lowers_the_loss(toy_task, name):
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    spec = {"num_virtual_tokens": N}
    start = load_base("tiny-random-llama")
    kind = get_kind(name)
    kind.attach(start.model, spec, seed=0)
    init, loss0 = kind.state(start.model), _mean_loss(start, toy_task)
    base = load_base("tiny-random-llama")
    cfg = TrainConfig(steps=12, batch_size=8, lr=5e-2, warmup=0, schedule="constant", progress=False, seed=0)
    patch = Trainer(base, name, dict(spec), toy_task, cfg).run()
    assert patch.spec["seed"] == 0 and patch.spec["init"] == "vocab"
    key = next(iter(init))
    assert not torch.equal(patch.tensors[key], init[key])
    loss1 = _mean_loss(base, toy_task)
    assert loss1 < loss0 - 0.05, (loss0, loss1)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("optimizer", ["zo-sgd", "forward-grad"])
def test_zeroth_order_training_runs(tiny, toy_task, name, optimizer):
    """zo-sgd perturbs the table through its module's forward; forward-grad differentiates it through torch.func."""
    from patchlm.train import TrainConfig, Trainer

    kind = get_kind(name)
    probe = kind.attach(tiny.model, {"num_virtual_tokens": N}, seed=0)
    init = kind.state(tiny.model)
    kind.detach(tiny.model)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, optimizer=optimizer, zo_eps=1e-2, warmup=0,
                      schedule="constant", progress=False)
    patch = Trainer(tiny, name, {"num_virtual_tokens": N}, toy_task, cfg).run()
    assert patch.spec == {**probe}
    key = next(iter(init))
    assert not torch.equal(patch.tensors[key], init[key])
    assert patch.metrics["forward_passes"] == (6 if optimizer == "zo-sgd" else 3)
    assert torch.isfinite(patch.tensors[key]).all()


@pytest.mark.parametrize(("name", "optimizer"), [("prefix", "zo-sgd"), ("prompt", "adamw")])
def test_interrupted_training_resumes_exactly(toy_task, tmp_path, name, optimizer):
    """A run killed after a checkpoint and resumed ends with the tensors of an uninterrupted run (bit for bit)."""
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    spec = {"num_virtual_tokens": N}
    cfg = TrainConfig(steps=4, save_every=2, batch_size=4, lr=1e-2 if optimizer == "adamw" else 1e-3,
                      optimizer=optimizer, progress=False, eval_limit=4)
    full = Trainer(load_base("tiny-random-llama"), name, dict(spec), toy_task, cfg).run().tensors
    with killed_after(2):
        Trainer(load_base("tiny-random-llama"), name, dict(spec), toy_task, cfg, out_dir=tmp_path / "run").run()
    resumed = Trainer(load_base("tiny-random-llama"), name, dict(spec), toy_task, cfg, out_dir=tmp_path / "run",
                      resume=True).run().tensors
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("name", KINDS)
def test_peft_loads_the_export_with_the_same_logits(tiny, tmp_path, name):
    from patchlm.adapters.peft_io import export_peft, import_peft

    patch = _trained_patch(tiny, name)
    ids, mask = _ids_mask()
    ours = _logits(tiny.model, ids, mask)
    export_peft(patch, tmp_path / "peft")  # peft_io dispatches prefix / prompt patches to PEFT's prompt learning
    pm = _peft_model(tmp_path / "peft")
    cfg = pm.peft_config["default"]
    assert cfg.peft_type.value == ("PREFIX_TUNING" if name == "prefix" else "PROMPT_TUNING")
    assert cfg.num_virtual_tokens == N
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    if name == "prompt":
        assert theirs.shape[1] == ids.shape[1] + N
        theirs = theirs[:, N:]  # PEFT's logits keep the virtual positions; patchlm's drop them
    assert (theirs - ours).abs().max() < 1e-5
    back = import_peft(tmp_path / "peft")
    assert back.kind == name and back.base == patch.base
    assert all(torch.equal(back.tensors[k], v) for k, v in patch.tensors.items())
    assert {k: back.spec[k] for k in patch.spec if k != "init"} == {k: v for k, v in patch.spec.items() if k != "init"}
    with pytest.raises(Exception):  # noqa: B017 - atomic_dir refuses an existing directory without force
        export_peft(patch, tmp_path / "peft")


@pytest.mark.parametrize("name", KINDS)
def test_cli_exports_to_peft(tiny, tmp_path, capsys, name):
    """`patchlm export DIR/patch --format peft` writes a PEFT adapter; --format merged is refused in one line."""
    patch = _trained_patch(tiny, name)
    ours = _logits(tiny.model)
    patch.save(tmp_path / "run" / "patch")
    code, _, err = run_cli(["export", str(tmp_path / "run" / "patch"), "--format", "peft", "--out",
                            str(tmp_path / "peft")], capsys)
    assert code == 0, err
    theirs = _logits(_peft_model(tmp_path / "peft"))
    assert (theirs[:, N:] if name == "prompt" else theirs).sub(ours).abs().max() < 1e-5
    code, _, err = run_cli(["export", str(tmp_path / "run" / "patch"), "--format", "merged", "--out",
                            str(tmp_path / "merged")], capsys)
    assert code == 2 and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", KINDS)
def test_peft_trained_adapter_imports(tmp_path, name):
    """An adapter PEFT made itself (its own init, its own save_pretrained) imports with PEFT's logits."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from patchlm.adapters.peft_io import import_peft
    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    cls = PrefixTuningConfig if name == "prefix" else PromptTuningConfig
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base.model, cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
        pm.save_pretrained(str(tmp_path / "theirs"))
    pm.eval()
    ids, mask = _ids_mask()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    patch = import_peft(tmp_path / "theirs", base=load_base("tiny-random-llama"))
    assert patch.kind == name and patch.spec["num_virtual_tokens"] == 4
    fresh = load_base("tiny-random-llama")
    patch.apply(fresh)
    ours = _logits(fresh.model, ids, mask)
    assert (theirs[:, 4:] if name == "prompt" else theirs).sub(ours).abs().max() < 1e-5


@pytest.mark.parametrize("name", KINDS)
def test_greedy_generation_equals_peft(tiny, tmp_path, name):
    """model.generate with the patch (the virtual tokens go in once, into the first forward's cache) gives PEFT's
    greedy tokens. PEFT 0.21's own generate() misses the cache under transformers 5.24's new `cache` name (prefix:
    the prefix is dropped; prompt: re-inserted every step), so PEFT's side is greedy decoding by its forward."""
    from patchlm.adapters.peft_prompt_io import export_prompt_peft

    patch = _trained_patch(tiny, name, std=0.5)
    export_prompt_peft(patch, tmp_path / "peft")
    pm = _peft_model(tmp_path / "peft")
    ids = sample_ids()[:1]
    steps = 5
    with torch.no_grad():
        ours = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                   do_sample=False)
        uncached = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                       do_sample=False, use_cache=False)
        cur = ids
        for _ in range(steps):
            logits = pm(input_ids=cur, attention_mask=torch.ones_like(cur)).logits
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ours.shape[1] == ids.shape[1] + steps
    assert ours.tolist() == cur.tolist() == uncached.tolist()
    base_gen = None
    get_kind(name).detach(tiny.model)
    with torch.no_grad():
        base_gen = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                       do_sample=False)
    assert base_gen.tolist() != ours.tolist()  # the patch does change what is generated
