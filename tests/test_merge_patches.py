"""Patch merges through dW: equal to merging the materialized weights; stacking, SVD re-factorization, the
merged kind, MoS through its LoRA form, Fisher estimation, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import old_causal_lm_loss, old_collate, run_cli

from patchlm.errors import BaseMismatchError, ConfigError
from patchlm.merge.merged import refactor
from patchlm.merge.patch_merge import PatchDeltas, merge_patches, patch_deltas
from patchlm.patch import Patch, get_kind

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_patch(base, seed: int, r: int = 4, alpha: float = 8.0, targets=TARGETS, scale: float = 0.1) -> Patch:
    """A LoRA patch with random A and B (as if trained) on `base`."""
    from patchlm.adapters import resolve_targets

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in resolve_targets(base.model, targets):
        lin = base.model.get_submodule(n)
        tensors[f"{n}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * scale
        tensors[f"{n}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * scale
    return Patch(kind="lora", base=base.ref(), spec={"r": r, "alpha": alpha, "targets": sorted(
        {k.rsplit(".", 1)[0] for k in tensors})}, tensors=tensors, provenance={"task": "toy"})


def weights_with(base, patch) -> dict[str, torch.Tensor]:
    """The effective linear weights of base + patch (the patch merged, then removed again)."""
    from patchlm.adapters.peft_io import to_lora_patch

    lp = to_lora_patch(patch) if patch.kind != "merged" else patch
    lp.apply(base, force=True)
    if lp.kind == "lora":
        from patchlm.adapters.lora import merge_lora

        merge_lora(base.model)
    out = {}
    for n, m in base.model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[n.removesuffix(".base")] = m.weight.detach().clone()
    get_kind(lp.kind).detach(base.model)
    return out


def test_lora_merge_through_dw_equals_merging_materialized_weights(tiny):
    from patchlm.merge.plan import plan_from_config
    from patchlm.merge.stream import merge_state_dicts

    p1, p2 = lora_patch(tiny, 1), lora_patch(tiny, 2, r=2, targets=["q_proj", "up_proj"])
    w0 = {n: m.weight.detach().clone() for n, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear)}
    dense = {"base": {f"{n}.weight": w for n, w in w0.items()},
             "a": {f"{n}.weight": w for n, w in weights_with(tiny, p1).items()},
             "b": {f"{n}.weight": w for n, w in weights_with(tiny, p2).items()}}
    for method, mp in (("ties", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]),
                       ("breadcrumbs", [{"weight": 1.0, "density": 0.8, "gamma": 0.05}] * 2),
                       ("dare_linear", [{"weight": 1.0, "density": 1.0}] * 2)):
        merged = merge_patches([p1, p2], method, model_params=mp)
        assert merged.kind == "merged"
        got = weights_with(tiny, merged)
        plan = plan_from_config({"merge_method": method, "base_model": "base",
                                 "models": [{"model": "a", "parameters": mp[0]}, {"model": "b", "parameters": mp[1]}]})
        want = merge_state_dicts(plan, dense)
        for n in w0:
            assert torch.allclose(got[n], want[f"{n}.weight"], atol=1e-5), (method, n)
    # the tiny model is restored after each detach
    for n, m in tiny.model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.weight, w0[n])


def test_task_arithmetic_of_loras_is_an_exact_stacked_lora(tiny):
    p1, p2 = lora_patch(tiny, 1), lora_patch(tiny, 2, r=2, alpha=2.0, targets=["q_proj", "up_proj"])
    stacked = merge_patches([p1, p2], "task_arithmetic", weights=[0.7, -0.3], params={"lambda": 2.0})
    assert stacked.kind == "lora" and stacked.metrics["stacked_rank"] == [2, 4, 6]
    d1, d2, ds = patch_deltas(p1), patch_deltas(p2), patch_deltas(stacked)
    for n in set(d1) | set(d2):
        want = 2.0 * (0.7 * d1.get(n, 0) - 0.3 * d2.get(n, 0))
        assert torch.allclose(ds[n], want, atol=1e-6)
    dense = merge_patches([p1, p2], "task_arithmetic", weights=[0.7, -0.3], params={"lambda": 2.0}, stack=False)
    dd = patch_deltas(dense)
    for n in ds:
        assert torch.allclose(dd[n], ds[n], atol=1e-6)


def test_refactor_error_is_the_svd_tail(tiny):
    p1, p2 = lora_patch(tiny, 1), lora_patch(tiny, 2)
    merged = merge_patches([p1, p2], "task_arithmetic", stack=False)
    _full, rep = refactor(merged, rank=8)  # sum of two rank-4 updates: rank <= 8, exact
    assert rep["refactor_rel_error"] < 1e-5
    low, rep2 = refactor(merged, rank=2)
    tail = tot = 0.0
    for d in patch_deltas(merged).values():
        s = torch.linalg.svdvals(d)
        tail += float((s[2:] ** 2).sum())
        tot += float((s ** 2).sum())
    assert rep2["refactor_rel_error"] == pytest.approx(math.sqrt(tail / tot), rel=1e-4)
    assert low.kind == "lora" and low.tensors[next(iter(low.tensors))].shape[0] == 2
    with pytest.raises(ConfigError, match="rank"):
        refactor(merged, rank=0)


def test_merged_kind_roundtrip_apply_detach(tiny, tmp_path):
    p1, p2 = lora_patch(tiny, 1), lora_patch(tiny, 2)
    merged = merge_patches([p1, p2], "ties", densities=[0.5, 0.5])
    merged.save(tmp_path / "m")
    loaded = Patch.load(tmp_path / "m")
    assert loaded.kind == "merged" and loaded.spec["method"] == "ties"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = tiny.model(ids).logits
    loaded.apply(tiny)
    patched = tiny.model(ids).logits
    assert not torch.allclose(before, patched)
    get_kind("merged").detach(tiny.model)
    assert torch.equal(tiny.model(ids).logits, before)
    # its LoRA form (exact SVD) computes the same function
    lora = get_kind("merged").materialize(loaded)
    lora.apply(tiny)
    assert torch.allclose(tiny.model(ids).logits, patched, atol=1e-4)


def test_mos_patches_merge_through_their_lora_form(tiny):
    kind = get_kind("mos")
    spec = {"r": 4, "e": 2, "p": 1, "l": 2, "alpha": 8, "targets": "qv", "seed": 0}
    given = dict(spec)
    spec = kind.attach(tiny.model, spec, None, seed=0)  # the resolved spec: targets as module names
    assert given["targets"] == "qv"  # the caller's dict is left as it was
    with torch.no_grad():
        for p in kind.trainable_parameters(tiny.model):
            p.normal_(0, 0.1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = tiny.model(ids).logits
    mos = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    kind.detach(tiny.model)
    merged = merge_patches([mos], "task_arithmetic", weights=[1.0], stack=False)
    merged.apply(tiny)
    assert torch.allclose(tiny.model(ids).logits, want, atol=1e-4)
    get_kind("merged").detach(tiny.model)


def test_patches_of_different_bases_are_refused(tiny):
    p1, p2 = lora_patch(tiny, 1), lora_patch(tiny, 2)
    p2.base = {**p2.base, "fingerprint": "blake2b:other"}
    with pytest.raises(BaseMismatchError, match="blake2b:other"):
        merge_patches([p1, p2], "ties")
    with pytest.raises(ConfigError, match="density"):
        merge_patches([p1, p1], "ties", densities=[0.5, 2.0])
    with pytest.raises(ConfigError, match="frob"):
        merge_patches([p1, p1], "ties", params={"frob": 1})


def test_fisher_estimate_is_mean_squared_per_example_gradient(tiny, toy_task):
    from patchlm.data.features import build_features, collate
    from patchlm.merge.fisher import estimate_fisher
    from patchlm.train.engine import causal_lm_loss

    p = lora_patch(tiny, 1, targets=["q_proj"])
    f = estimate_fisher(tiny, p, toy_task, n_examples=2, max_length=32)
    name = "model.layers.0.self_attn.q_proj"
    # by hand: the same two examples, one backward each, on the patched model
    p.apply(tiny)
    w = tiny.model.get_submodule(name).base.weight
    w.requires_grad_(True)
    acc = torch.zeros_like(w)
    for feat in build_features(toy_task, "train", tiny.tokenizer, "classification", 32, limit=2):
        loss, _ = causal_lm_loss(tiny.model, collate([feat], tiny.tokenizer.pad_token_id))
        (g,) = torch.autograd.grad(loss, w)
        acc += g ** 2
    w.requires_grad_(False)
    get_kind("lora").detach(tiny.model)
    assert torch.allclose(f[name], acc / 2, rtol=1e-4, atol=1e-12)
    assert set(f) == set(PatchDeltas(p).modules)
    fm = merge_patches([p, lora_patch(tiny, 2, targets=["q_proj"])], "fisher",
                       fishers=[f, {k: torch.ones_like(v) for k, v in f.items()}])
    assert fm.kind == "merged"


def test_cli_merges_patches(tiny, tmp_path, capsys):
    lora_patch(tiny, 1).save(tmp_path / "a")
    lora_patch(tiny, 2).save(tmp_path / "b")
    code, out, err = run_cli(["merge", "-p", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "--method", "ties",
                              "-d", "0.5", "--rank", "4", "--out", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["kind"] == "lora" and 0 < rep["refactor_rel_error"] < 1
    assert Patch.load(tmp_path / "m").kind == "lora"
    code, out, err = run_cli(["merge", "-p", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "--method",
                              "task_arithmetic", "--out", str(tmp_path / "s"), "--json"], capsys)
    assert code == 0, err and json.loads(out)["kind"] == "lora"
    code, out, err = run_cli(["merge", "-p", str(tmp_path / "a"), "-m", "x", "--method", "ties",
                              "--out", str(tmp_path / "z")], capsys)
    assert code == 2 and "not both" in err


# ---------------------------------------------------------------- the refactor changed no numbers
def _old_estimate_fisher(base, patch, task, n_examples=32, max_length=128, bf16=False, split="train"):
    """merge/fisher.py's estimate_fisher as of af73a9d (reference copy: CPU autocast, batches left on the CPU)."""
    from patchlm.data.features import build_features, objective_for

    modules = PatchDeltas(patch).modules
    model = base.model
    patch.apply(base)
    kind = get_kind(patch.kind)
    weights = {}
    try:
        for name in modules:
            mod = model.get_submodule(name)
            weights[name] = getattr(mod, "base", mod).weight
        feats = build_features(task, split, base.tokenizer, objective_for(task), max_length, limit=n_examples)
        req = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
        pad = base.tokenizer.pad_token_id or 0
        was = model.training
        model.eval()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        for f in feats:
            batch = old_collate([f], pad)
            with ctx:
                loss, _ = old_causal_lm_loss(model, batch)
            loss.backward()
            for n, w in weights.items():
                acc[n].add_(w.grad.float() ** 2)
                w.grad = None
        model.train(was)
        for n, p in model.named_parameters():
            p.requires_grad_(req.get(n, False))
        return {n: a / len(feats) for n, a in acc.items()}
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)
        kind.detach(model)


@pytest.mark.parametrize("bf16", [False, True])
def test_fisher_on_the_engine_equals_the_old_loop(tiny, toy_task, bf16):
    from patchlm.merge.fisher import estimate_fisher

    p = lora_patch(tiny, 3, targets=["q_proj", "down_proj"])
    want = _old_estimate_fisher(tiny, p, toy_task, n_examples=3, max_length=32, bf16=bf16)
    got = estimate_fisher(tiny, p, toy_task, n_examples=3, max_length=32, bf16=bf16)
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert not any(q.requires_grad for q in tiny.model.parameters())  # flags restored, patch detached
    assert not any("lora" in n for n, _ in tiny.model.named_parameters())


def test_fisher_count_is_a_named_field(tiny, toy_task):
    from patchlm.merge.fisher import estimate_fisher

    with pytest.raises(ConfigError, match="fisher_examples") as e:
        estimate_fisher(tiny, lora_patch(tiny, 1), toy_task, n_examples=0)
    assert e.value.field == "fisher_examples"


def test_merged_kind_declares_itself_and_attach_returns_the_spec(tiny):
    from patchlm.patch import kind_can

    kind = get_kind("merged")
    assert kind.stage == "weight" and kind_can("merged", "materialize") and kind_can("merged", "export-merged")
    merged = merge_patches([lora_patch(tiny, 1), lora_patch(tiny, 2)], "ties", densities=[0.5, 0.5])
    spec = dict(merged.spec)
    resolved = kind.attach(tiny.model, merged.spec, merged.tensors)
    kind.detach(tiny.model)
    assert resolved == spec and merged.spec == spec and resolved is not merged.spec


def test_a_kind_without_a_lora_form_is_refused_by_capability(tiny):
    from patchlm.errors import PatchFormatError
    from patchlm.merge.patch_merge import lora_form

    drop = Patch(kind="drop", base=tiny.ref(), spec={}, tensors={})
    with pytest.raises(PatchFormatError, match="materialize"):
        lora_form(drop)


def test_run_plan_writes_the_patch_and_names_rank_for_checkpoints(tiny, tmp_path):
    from patchlm.merge.config import MergeConfig
    from patchlm.merge.plan import plan_from_options
    from patchlm.merge.runner import run_plan

    lora_patch(tiny, 1).save(tmp_path / "a")
    lora_patch(tiny, 2).save(tmp_path / "b")
    plan = plan_from_options([str(tmp_path / "a"), str(tmp_path / "b")], "ties", densities=[0.5])
    rep = run_plan(plan, tmp_path / "m", MergeConfig(rank=4))
    assert rep["kind"] == "lora" and Patch.load(tmp_path / "m").kind == "lora"
    ck = plan_from_options(["x", "y"], "linear")
    with pytest.raises(ConfigError, match="rank") as e:
        run_plan(ck, tmp_path / "c", MergeConfig(rank=4))
    assert e.value.field == "rank" and not (tmp_path / "c").exists()


def test_merge_config_shard_size_is_binary_by_default():
    from patchlm.merge.config import DEFAULT_SHARD_BYTES, MergeConfig, parse_size

    assert MergeConfig().shard_bytes == DEFAULT_SHARD_BYTES == 2 * 2**30
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ConfigError, match="shard_size") as e:
        MergeConfig(shard_size="lots")
    assert e.value.field == "shard_size"


def test_cli_merge_options_default_to_their_config_fields():
    import dataclasses

    from patchlm.cli.merge import glue, merge, port

    for cmd in (merge, glue, port):
        for param, (cls, name, default) in cmd.__patchlm_fields__.items():
            f = next(f for f in dataclasses.fields(cls) if f.name == name)
            want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert default == want, (cmd.__name__, param)
    flags = {p for p in merge.__patchlm_fields__}
    assert {"rank", "stack", "fisher_examples", "shard_size", "seed", "dtype", "out_dtype"} <= flags
