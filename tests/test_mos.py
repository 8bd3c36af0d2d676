"""MoS (Mixture of Shards): parameter budget, construction by hand, materialization, switches, errors, PEFT."""

import json

import pytest
import torch
from conftest import run_cli

from patchlm.adapters.lora import LoraLinear
from patchlm.adapters.mos import STRATEGIES, MosLinear, draw_indices, group_modules, mos_config
from patchlm.errors import ConfigError
from patchlm.patch import Patch, get_kind

SPEC = {"r": 4, "e": 2, "p": 1, "l": 2, "alpha": 8, "targets": "all-linear"}  # tiny: L=4, hidden 64, mlp 128


def _ids():
    return torch.tensor([[5, 17, 300, 4000, 12, 9, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8]])


def _attach(base, seed=0, **over):
    """Attach MoS; return the kind and the resolved spec attach returns (the given dict stays as it was)."""
    kind = get_kind("mos")
    given = {**SPEC, **over}
    spec = kind.attach(base.model, dict(given), seed=seed)
    return kind, spec


def _randomize(kind, model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kind.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _mods(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MosLinear)}


def _by_type(model):
    out = {}
    for _n, m in _mods(model).items():
        out.setdefault(m.group, []).append(m)
    return {k: sorted(v, key=lambda m: m.layer) for k, v in out.items()}


@pytest.mark.parametrize("off", [None, *STRATEGIES, "all"])
def test_trainable_count_is_lora_at_rank_e(tiny, off):
    """Pools hold e*L*(d_in+d_out) per type: exactly LoRA at rank e, in every ablation."""
    over = {s: False for s in STRATEGIES} if off == "all" else ({off: False} if off else {})
    kind, spec = _attach(tiny, **over)
    lora_e = sum(2 * (m.base.in_features + m.base.out_features) for m in _mods(tiny.model).values())
    # hand count for tiny-random-llama (hidden 64, 4 heads / 2 KV heads of 16 -> k,v out 32, mlp 128), L=4, e=2
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64)
    assert lora_e == 2 * 4 * per_layer
    params = kind.trainable_parameters(tiny.model)
    assert len(params) == 14  # one A pool and one B pool per projection type
    assert sum(p.numel() for p in params) == lora_e
    assert sum(p.numel() for p in tiny.model.parameters() if p.requires_grad) == lora_e
    patch = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    assert patch.trainable_params == lora_e
    assert patch.info()["equivalent_lora_rank"] == 2


def test_fresh_mos_is_identity(tiny):
    ref = tiny.model(_ids()).logits
    _attach(tiny)
    assert torch.equal(tiny.model(_ids()).logits, ref)


def test_construction_by_hand(tiny):
    """idx = public draw without replacement ++ this layer's private slice; A row j = l shards concatenated."""
    kind, _spec = _attach(tiny, seed=5)
    _randomize(kind, tiny.model)
    r, e, p, l, L = 4, 2, 1, 2, 4
    n_pub, N = (e - p) * L * l, e * L * l
    for _key, mods in _by_type(tiny.model).items():
        for i, m in enumerate(mods):
            for idx, pool, d in ((m.idx_A, m.pool_A, m.base.in_features), (m.idx_B, m.pool_B, m.base.out_features)):
                assert pool.shape == (N, d // l)
                assert idx.shape == (r * l,)
                pub, priv = idx[: (r - p) * l], idx[(r - p) * l:]
                assert len(set(pub.tolist())) == len(pub) and int(pub.max()) < n_pub
                assert priv.tolist() == list(range(n_pub + i * p * l, n_pub + (i + 1) * p * l))
            A, B = m.lora_A(), m.lora_B()
            for j in range(r):
                rows = [m.pool_A[int(m.idx_A[j * l + s])] for s in range(l)]
                assert torch.equal(A[j], torch.cat(rows))
                rows = [m.pool_B[int(m.idx_B[j * l + s])] for s in range(l)]
                assert torch.equal(B[:, j], torch.cat(rows))
            # the module's output is W x + (alpha/r) B A x
            x = torch.randn(3, m.base.in_features)
            want = m.base(x) + (8 / 4) * x @ A.T @ B.T
            assert torch.allclose(m(x), want, atol=1e-6)


def test_materialized_lora_gives_same_outputs(tiny):
    kind, spec = _attach(tiny)
    _randomize(kind, tiny.model)
    ours = tiny.model(_ids()).logits.detach()
    patch = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    lora = kind.materialize(patch)
    assert lora.kind == "lora" and lora.spec["r"] == 4 and lora.spec["scaling"] == 2.0
    assert len(lora.tensors) == 2 * 28
    mods = _mods(tiny.model)
    for n, m in mods.items():
        assert torch.equal(lora.tensors[f"{n}.lora_A"], m.lora_A().detach())
        assert torch.equal(lora.tensors[f"{n}.lora_B"], m.lora_B().detach())
    kind.detach(tiny.model)
    assert not _mods(tiny.model)
    lora.apply(tiny)
    assert any(isinstance(m, LoraLinear) for m in tiny.model.modules())
    assert (tiny.model(_ids()).logits - ours).abs().max() < 1e-5


def test_pool_gradient_is_sum_over_layers(tiny):
    """The shared pool's gradient equals the materialized LoRA gradients scattered back to their shards."""
    kind, spec = _attach(tiny)
    _randomize(kind, tiny.model)
    patch = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    tiny.model(_ids()).logits.float().pow(2).mean().backward()
    mos_grads = {m.group: (m.pool_A.grad.clone(), m.pool_B.grad.clone()) for m in _mods(tiny.model).values()}
    kind.detach(tiny.model)
    lora = kind.materialize(patch)
    lora.apply(tiny)
    tiny.model(_ids()).logits.float().pow(2).mean().backward()
    loras = {n: m for n, m in tiny.model.named_modules() if isinstance(m, LoraLinear)}
    for key, members in group_modules(list(spec["targets"])).items():
        ga = torch.zeros_like(mos_grads[key][0])
        gb = torch.zeros_like(mos_grads[key][1])
        for i, n in enumerate(members):
            ia, ib = patch.tensors[f"mos.{key}.idx_A"][i].long(), patch.tensors[f"mos.{key}.idx_B"][i].long()
            ga.index_add_(0, ia, loras[n].lora_A.grad.reshape(len(ia), -1))
            gb.index_add_(0, ib, loras[n].lora_B.grad.t().reshape(len(ib), -1))
        assert torch.allclose(ga, mos_grads[key][0], atol=1e-6)
        assert torch.allclose(gb, mos_grads[key][1], atol=1e-6)


def test_indices_deterministic_and_survive_save_load(tiny, tmp_path):
    from patchlm.models import load_base

    kind, spec = _attach(tiny, seed=7)
    init = kind.state(tiny.model)
    _randomize(kind, tiny.model)
    state = kind.state(tiny.model)
    out = tiny.model(_ids()).logits.detach()
    other = load_base("tiny-random-llama")
    kind.attach(other.model, {**SPEC}, seed=7)
    again = kind.state(other.model)
    assert all(torch.equal(init[k], again[k]) for k in init)  # same seed: same indices and same init
    third = load_base("tiny-random-llama")
    kind.attach(third.model, {**SPEC}, seed=8)
    diff = kind.state(third.model)
    assert any(not torch.equal(state[k], diff[k]) for k in state if ".idx_" in k)
    Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=state).save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert loaded.spec["seed"] == 7
    assert loaded.trainable_params == sum(p.numel() for p in kind.trainable_parameters(tiny.model))
    fresh = load_base("tiny-random-llama")
    loaded.apply(fresh)
    for n, m in _mods(fresh.model).items():
        ref = tiny.model.get_submodule(n)
        assert torch.equal(m.idx_A, ref.idx_A) and torch.equal(m.idx_B, ref.idx_B)
    assert torch.equal(fresh.model(_ids()).logits, out)
    # indices also re-derive from the seed alone
    cfg = mos_config(loaded.spec)
    for g, key in enumerate(group_modules(loaded.spec["targets"])):
        ia, ib = draw_indices(cfg, 4, g)
        assert torch.equal(ia, loaded.tensors[f"mos.{key}.idx_A"].long())
        assert torch.equal(ib, loaded.tensors[f"mos.{key}.idx_B"].long())


def test_compact_file_smaller_than_materialized(tiny, tmp_path):
    kind, spec = _attach(tiny)
    patch = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    patch.save(tmp_path / "mos")
    kind.materialize(patch).save(tmp_path / "lora")
    mos_b = (tmp_path / "mos" / "tensors.safetensors").stat().st_size
    lora_b = (tmp_path / "lora" / "tensors.safetensors").stat().st_size
    # pools are LoRA at rank e=2 (float32) + int16 indices; the materialized LoRA is rank r=4 everywhere
    assert mos_b < 0.75 * lora_b
    assert not any(k.endswith((".lora_A", ".lora_B")) for k in patch.tensors)


def _indices(base, seed=0, **over):
    _kind, spec = _attach(base, seed=seed, **over)
    return {k: (torch.stack([m.idx_A for m in v]), torch.stack([m.idx_B for m in v]), v[0].pool_A.shape)
            for k, v in _by_type(base.model).items()}, spec


def test_switch_subset_selection(tiny):
    from patchlm.models import load_base

    full, _ = _indices(tiny)
    off, _ = _indices(load_base("tiny-random-llama"), subset_selection=False)
    k_pub = (4 - 1) * 2
    for key in full:
        fa, fb, shape = full[key]
        oa, ob, oshape = off[key]
        assert oshape == shape
        for o, f in ((oa, fa), (ob, fb)):
            assert all(torch.equal(o[i, :k_pub], o[0, :k_pub]) for i in range(4))  # same subset in every layer
            assert torch.equal(o[0], f[0])  # layer 0's draw, unchanged
            assert torch.equal(o[:, k_pub:], f[:, k_pub:])  # private slices untouched
        assert any(not torch.equal(fa[i, :k_pub], fa[0, :k_pub]) for i in range(4))  # on: layers differ


def test_switch_pair_dissociation(tiny):
    from patchlm.models import load_base

    full, _ = _indices(tiny)
    off, _ = _indices(load_base("tiny-random-llama"), pair_dissociation=False)
    for key in full:
        assert torch.equal(off[key][0], full[key][0])  # A's indices unchanged
        assert torch.equal(off[key][1], off[key][0])  # B uses A's
        assert not torch.equal(full[key][1], full[key][0])


def test_switch_vector_sharding(tiny):
    from patchlm.models import load_base

    full, _ = _indices(tiny)
    off, spec = _indices(load_base("tiny-random-llama"), vector_sharding=False)
    assert mos_config(spec).l == 1 and mos_config(spec).p == 1
    for key in full:
        N, w = full[key][2]
        assert off[key][2] == (N // 2, w * 2)  # whole vectors: half the rows, twice the width, same size
        assert off[key][0].shape == (4, 4)  # r indices per layer, one per rank vector
        n_pub = 1 * 4 * 1
        assert off[key][0][:, 3:].flatten().tolist() == [n_pub + i for i in range(4)]


def test_switch_privatization(tiny):
    from patchlm.models import load_base

    full, _ = _indices(tiny)
    off, spec = _indices(load_base("tiny-random-llama"), privatization=False)
    assert mos_config(spec).p == 0
    for key in full:
        assert off[key][2] == full[key][2]  # same pool
        fa = full[key][0]
        # on: rows >= N_pub=8 are private, each used by one layer only
        for i in range(4):
            assert set(fa[i, 6:].tolist()) == {8 + 2 * i, 9 + 2 * i}
            assert not (set(fa[i].tolist()) & set(range(8, 16)) - {8 + 2 * i, 9 + 2 * i})
        # off: every index is a public draw without replacement from the whole pool of 16
        oa = off[key][0]
        assert oa.shape == (4, 8) and all(len(set(row.tolist())) == 8 for row in oa)
        used_by = {}
        for i in range(4):
            for v in oa[i].tolist():
                used_by.setdefault(v, set()).add(i)
        assert any(v >= 8 and len(s) > 1 for v, s in used_by.items())  # no row region belongs to one layer


def test_pure_sharing_gives_identical_layers(tiny):
    kind, spec = _attach(tiny, **{s: False for s in STRATEGIES})
    _randomize(kind, tiny.model)
    cfg = mos_config(spec)
    assert (cfg.l, cfg.p) == (1, 0)
    for _key, mods in _by_type(tiny.model).items():
        d0 = mods[0].delta()
        assert all(torch.equal(m.delta(), d0) for m in mods)
        assert torch.equal(mods[0].idx_A, mods[0].idx_B)


@pytest.mark.parametrize("over,match", [
    ({"p": 3}, r"p=3 exceeds the equivalent rank e=2.*lower p"),
    ({"l": 3}, r"l=3 does not divide .*set l to one of"),
    ({"r": 8}, r"r=8 asks .*lower r to at most 5"),
    ({"r": 0}, r"r must be positive.*set r to 1"),
    ({"e": 1, "p": 1}, r"no public shards.*lower p"),
    ({"p": -1}, r"p must not be negative"),
    ({"r": 2.5}, r"r must be an integer"),
    ({"dropout": 1.5}, r"dropout"),
    ({"rank": 4}, r"unknown mos spec key 'rank'"),
])
def test_bad_hyper_parameters_fail_clearly_and_change_nothing(tiny, over, match):
    ref = tiny.model(_ids()).logits
    with pytest.raises(ConfigError, match=match):
        _attach(tiny, **over)
    assert not _mods(tiny.model)
    assert torch.equal(tiny.model(_ids()).logits, ref)


def test_peft_export_reloads_with_equal_logits(tiny, tmp_path):
    from peft import PeftModel

    from patchlm.adapters.peft_io import export_peft, to_lora_patch
    from patchlm.models import load_base

    kind, spec = _attach(tiny, alpha=5)
    _randomize(kind, tiny.model)
    ours = tiny.model(_ids()).logits.detach()
    patch = Patch(kind="mos", base=tiny.ref(), spec=spec, tensors=kind.state(tiny.model))
    patch.save(tmp_path / "mos")
    loaded = Patch.load(tmp_path / "mos")
    assert to_lora_patch(loaded).kind == "lora"
    export_peft(loaded, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and abs(cfg["lora_alpha"] / cfg["r"] - 5 / 4) < 1e-9
    peft_model = PeftModel.from_pretrained(load_base("tiny-random-llama").model, str(tmp_path / "peft"))
    assert (peft_model(_ids()).logits - ours).abs().max() < 1e-5


def test_trainer_trains_pools_and_resumes_exactly(tiny, toy_task, tmp_path, monkeypatch):
    import patchlm.train.trainer as tr
    from patchlm.errors import OutputExistsError
    from patchlm.models import load_base
    from patchlm.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, save_every=3, progress=False, eval_limit=8)
    spec = {**SPEC, "dropout": 0.1}  # dropout draws from the RNG, which the checkpoint must restore
    patch = Trainer(tiny, "mos", dict(spec), toy_task, cfg, out_dir=tmp_path / "run").run()
    assert patch.kind == "mos" and patch.trainable_params == 2 * 4 * 1024
    assert any(t.abs().sum() > 0 for k, t in patch.tensors.items() if k.endswith(".pool_B"))  # B moved off zero
    trained = tiny.model(_ids()).logits.detach()
    fresh = load_base("tiny-random-llama")
    Patch.load(tmp_path / "run" / "patch").apply(fresh)
    assert torch.allclose(fresh.model(_ids()).logits, trained, atol=1e-6)

    # interrupt in the middle of step 5 (after the step-3 checkpoint), then resume: the same patch exactly
    real, calls = tr.causal_lm_loss, {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(tr, "causal_lm_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_base("tiny-random-llama"), "mos", dict(spec), toy_task, cfg, out_dir=tmp_path / "b").run()
    assert json.loads((tmp_path / "b" / "checkpoints" / "last" / "state.json").read_text())["step"] == 3
    assert not (tmp_path / "b" / "patch").exists()
    monkeypatch.setattr(tr, "causal_lm_loss", real)
    with pytest.raises(OutputExistsError):
        Trainer(load_base("tiny-random-llama"), "mos", dict(spec), toy_task, cfg, out_dir=tmp_path / "b")
    resumed = Trainer(load_base("tiny-random-llama"), "mos", dict(spec), toy_task, cfg, out_dir=tmp_path / "b",
                      resume=True).run()
    assert resumed.spec == patch.spec
    assert set(resumed.tensors) == set(patch.tensors)
    for k in patch.tensors:
        assert torch.equal(resumed.tensors[k], patch.tensors[k]), k


def test_cli_train_mos_and_info(tmp_path, capsys):
    code, out, err = run_cli(["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--method", "mos", "--mos-r", "4",
                              "--mos-e", "2", "--mos-p", "1", "--mos-l", "2", "--no-pair-dissociation", "--steps", "2",
                              "--max-examples", "40", "--eval-limit", "8", "-q", "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    code, out, err = run_cli(["info", str(tmp_path / "m" / "patch"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "mos" and info["trainable_params"] == 2 * 4 * 1024
    assert info["equivalent_lora_rank"] == 2 and info["strategies"]["pair_dissociation"] is False
    assert info["file_bytes"] > 0
    code, out, err = run_cli(["export", str(tmp_path / "m" / "patch"), "--format", "peft", "--out",
                              str(tmp_path / "peft")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4
    code, out, err = run_cli(["train", "-m", "tiny-random-llama", "-t", "sms_spam", "--method", "mos", "--mos-p", "5",
                              "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--mos-p" in err and not (tmp_path / "bad").exists()
