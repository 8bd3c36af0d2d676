"""MindSkip routers: exact at zero init, real skipping (no work, no cache), prefill decision reuse,
straight-through gradient in closed form, training touches only routers, patch round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import old_causal_lm_loss, old_collate
from test_depth import IDS, greedy_cached, greedy_reforward

from patchlm.depth import runtime
from patchlm.depth.drop import kv_cache_bytes
from patchlm.depth.skip import Router, RouterKind, SkipConfig, default_layers, parse_layers, route_stats, train_routers
from patchlm.errors import BaseMismatchError, ConfigError, PatchFormatError
from patchlm.patch import Patch
from patchlm.train.checkpoint import load_state


def _normed_means(model, layer: int, ids) -> torch.Tensor:
    """Mean over tokens of the normed hidden state entering layer `layer`'s attention: [B, hidden]."""
    got = {}
    h = model.model.layers[layer].input_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__("x", o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got["x"].float().mean(1)


def _split_weight(xbar: torch.Tensor) -> torch.Tensor:
    """A router weight that keeps sequence 0 (w.x0 > 0) and skips sequence 1 (w.x1 < 0)."""
    d, mid = xbar[0] - xbar[1], (xbar[0] + xbar[1]) / 2
    w = d - (d @ mid) / (mid @ mid) * mid
    return (w * 50).unsqueeze(0)


def test_default_layers_and_parse():
    assert default_layers(30) == list(range(14, 29))
    assert default_layers(30, 4) == [25, 26, 27, 28]
    assert parse_layers("3,5,10-12", 30) == [3, 5, 10, 11, 12]
    with pytest.raises(ConfigError, match="out of range"):
        parse_layers("29-31", 30)
    with pytest.raises(ConfigError, match="last 29") as e:  # the library names the config field
        default_layers(30, 29)
    assert e.value.field == "last"


def test_zero_init_routers_give_exact_base_outputs(tiny):
    ref = tiny.model(input_ids=IDS).logits
    RouterKind().attach(tiny.model, {"layers": [1, 2]})
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)
    tiny.model.train()
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)  # straight-through mask is exactly 1.0
    tiny.model.eval()
    assert route_stats(tiny.model) == {1: 1.0, 2: 1.0}
    tok = Router(64, "token")
    assert float(tok.score(torch.randn(2, 5, 64), None).detach().unique()) == 0.5
    RouterKind().detach(tiny.model)
    assert type(tiny.model.model.layers[1]).__name__ == "LlamaDecoderLayer"
    assert not any("router" in n for n, _ in tiny.model.named_parameters())


def test_router_attach_returns_the_resolved_spec_and_leaves_the_given_one(tiny):
    spec = {"num_layers": 4}
    resolved = RouterKind().attach(tiny.model, spec)
    assert spec == {"num_layers": 4}
    assert resolved == {"num_layers": 4, "layers": default_layers(4), "granularity": SkipConfig.granularity}
    assert sorted(runtime.routers(tiny.model)) == default_layers(4)


def test_token_level_zero_init_exact(tiny):
    ref = tiny.model(input_ids=IDS).logits
    RouterKind().attach(tiny.model, {"layers": [2], "granularity": "token"})
    assert torch.equal(tiny.model(input_ids=IDS).logits, ref)


def test_skipped_sequences_do_no_attention_work_and_keep_no_cache(tiny):
    m = tiny.model
    w = _split_weight(_normed_means(m, 2, IDS))
    full_cache = m(input_ids=IDS, use_cache=True).past_key_values
    seen = []
    m.model.layers[2].self_attn.register_forward_hook(lambda mod, a, kw, o: seen.append(kw["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    RouterKind().attach(m, {"layers": [2, 3]}, {"layers.2.router.weight": w,
                                                "layers.3.router.weight": torch.zeros(1, 64)})
    seen.clear()
    out = m(input_ids=IDS, use_cache=True)
    assert seen == [1]  # only the kept sequence went through layer 2's attention
    layers = out.past_key_values.layers
    assert layers[2].keys.shape[0] == 1 and layers[1].keys.shape[0] == 2
    assert kv_cache_bytes(out.past_key_values) == kv_cache_bytes(full_cache) * 7 // 8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes in the batch split
        assert m(input_ids=IDS).logits.shape == (2, IDS.shape[1], m.config.vocab_size)
    # all sequences skip: no call and no cache layer at all
    with torch.no_grad():
        runtime.routers(m)[2].weight.copy_(-100 * _normed_means(m, 2, IDS).mean(0))  # w.xbar_b < 0 for both
    seen.clear()
    out = m(input_ids=IDS, use_cache=True)
    assert seen == [] and not out.past_key_values.layers[2].is_initialized
    assert route_stats(m)[2] < 1.0


def test_routed_generation_matches_reference(tiny):
    """Batch of 2, sequence 1 skips layer 2 at prefill: cached greedy decoding equals, per sequence, the
    no-cache re-forward of the model with (seq 1) or without (seq 0) layer 2's attention dropped."""
    m = tiny.model
    w = _split_weight(_normed_means(m, 2, IDS))
    RouterKind().attach(m, {"layers": [2]}, {"layers.2.router.weight": w})
    calls = []
    router = runtime.routers(m)[2]
    orig = router.score

    def counting(x, ctx):
        calls.append(1)
        return orig(x, ctx)

    router.score = counting
    toks, logits, cache = greedy_cached(m, IDS, 6)
    assert len(calls) == 1  # decided once at prefill, reused for the 6 decoding steps
    assert cache.layers[2].keys.shape[0] == 1 and cache.get_seq_length() == IDS.shape[1] + 6
    RouterKind().detach(m)
    ref0_toks, ref0_logits = greedy_reforward(m, IDS[:1], 6)
    runtime.apply_drops(m, [2], [])
    ref1_toks, ref1_logits = greedy_reforward(m, IDS[1:], 6)
    assert torch.equal(toks[0], ref0_toks[0]) and torch.equal(toks[1], ref1_toks[0])
    assert torch.allclose(logits[0], ref0_logits[0], atol=1e-4)
    assert torch.allclose(logits[1], ref1_logits[0], atol=1e-4)


def test_straight_through_gradient_closed_form(tiny):
    """d mean(m) / dw = sigmoid'(0) * mean_b xbar_b / n_routers = 0.25 * mean_b xbar_b / 2 at zero init."""
    m = tiny.model
    xbars = {i: _normed_means(m, i, IDS) for i in (2, 3)}
    RouterKind().attach(m, {"layers": [2, 3]})
    m.train()
    m(input_ids=IDS, use_cache=False)
    rs = runtime.routers(m)
    cap = torch.stack([r.last_mask.mean() for r in rs.values()]).mean()
    assert float(cap.detach()) == 1.0
    cap.backward()
    for i, r in rs.items():
        want = 0.25 * xbars[i].mean(0) / 2
        assert torch.allclose(r.weight.grad[0], want, atol=1e-6)
    assert all(p.grad is None for n, p in m.named_parameters() if "router" not in n)


def test_train_routers_only_routers_change(tiny, toy_task, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    p = train_routers(tiny, toy_task, [2, 3], config=SkipConfig(samples=16, batch_size=8, lam=5.0, lr=0.05))
    assert set(p.tensors) == {"layers.2.router.weight", "layers.3.router.weight"}
    assert any(float(t.abs().sum()) > 0 for t in p.tensors.values())
    assert p.metrics["steps"] == 2 and p.spec["layers"] == [2, 3] and p.trainable_params == 128
    for n, q in tiny.model.named_parameters():
        if "router" not in n:
            assert torch.equal(q, before[n]), n
    out_live = tiny.model(input_ids=IDS).logits
    p.save(tmp_path / "r")
    RouterKind().detach(tiny.model)
    q = Patch.load(tmp_path / "r")
    q.apply(tiny)
    assert torch.equal(tiny.model(input_ids=IDS).logits, out_live)


def test_router_training_resumes_exactly(tiny, toy_task, tmp_path):
    from patchlm.errors import TrainingInterrupted

    cfg = SkipConfig(samples=32, batch_size=4, lam=2.0, lr=0.05)  # 8 steps
    whole = train_routers(tiny, toy_task, [2, 3], config=cfg)
    RouterKind().detach(tiny.model)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted, match="after step 3 of 8"):
        train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=ckpt, save_every=2, stop_after=3)
    RouterKind().detach(tiny.model)
    assert not (ckpt / "state.pt").exists()  # safetensors + JSON, never a pickle
    assert load_state(ckpt, "state")["step"] == 3
    with pytest.raises(ConfigError, match="other settings"):
        train_routers(tiny, toy_task, [2, 3], config=SkipConfig(samples=32, batch_size=4, lam=1.0, lr=0.05),
                      checkpoint_dir=ckpt, resume=True)
    RouterKind().detach(tiny.model)
    resumed = train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=ckpt, resume=True)
    RouterKind().detach(tiny.model)
    assert resumed.metrics["steps"] == whole.metrics["steps"] == 8
    for k, v in whole.tensors.items():
        assert torch.allclose(resumed.tensors[k], v, atol=1e-6), k
    with pytest.raises(ConfigError, match="nothing to resume"):
        train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=tmp_path / "none", resume=True)


def test_routers_and_drops_stack(tiny):
    runtime.apply_drops(tiny.model, [1], [])
    RouterKind().attach(tiny.model, {"layers": [3]})
    _, _, cache = greedy_cached(tiny.model, IDS, 3)
    assert sum(c.is_initialized for c in cache.layers) == 3
    with pytest.raises(ConfigError, match="dropped"):
        RouterKind().attach(tiny.model, {"layers": [1]})
    with pytest.raises(ConfigError, match="MindSkip router"):
        runtime.apply_drops(tiny.model, [3], [])
    assert runtime.dropped(tiny.model) == ([1], [])  # failed calls changed nothing


def test_router_bad_input(tiny):
    with pytest.raises(ConfigError, match="first remaining attention layer"):
        RouterKind().attach(tiny.model, {"layers": [0, 2]})
    with pytest.raises(ConfigError, match="out of range"):
        RouterKind().attach(tiny.model, {"layers": [7]})
    with pytest.raises(PatchFormatError, match="hidden size"):
        RouterKind().attach(tiny.model, {"layers": [2], "hidden_size": 576})
    with pytest.raises(PatchFormatError, match="shape"):
        RouterKind().attach(tiny.model, {"layers": [2]}, {"layers.2.router.weight": torch.zeros(1, 32)})
    with pytest.raises(ConfigError, match="granularity"):
        Router(64, "layer")
    assert runtime.routers(tiny.model) == {}
    p = Patch(kind="router", base={**tiny.ref(), "fingerprint": "blake2b:x"}, spec={"layers": [2]},
              tensors={"layers.2.router.weight": torch.zeros(1, 64)})
    with pytest.raises(BaseMismatchError):
        p.apply(tiny)
    with pytest.raises(ConfigError, match="capacity target"):
        SkipConfig(target=1.5)


def test_padded_batch_split_equals_sequences_alone(tiny):
    """Right-padded batch: routing decisions use the valid tokens only, and the split batch gives each
    sequence exactly what it gets alone (one kept, one skipped)."""
    m = tiny.model
    a, c = IDS[:1, :10], IDS[1:, :6]
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, :6] = a[0], c[0]
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1
    xbar = torch.cat([_normed_means(m, 2, a), _normed_means(m, 2, c)])
    RouterKind().attach(m, {"layers": [2]}, {"layers.2.router.weight": _split_weight(xbar)})
    with torch.no_grad():
        batch = m(input_ids=ids, attention_mask=mask).logits
        alone_a, alone_c = m(input_ids=a).logits, m(input_ids=c).logits
    assert route_stats(m) == {2: 0.5}  # kept in the batch and alone (a), skipped both times (c)
    assert torch.allclose(batch[0], alone_a[0], atol=1e-5)
    assert torch.allclose(batch[1, :6], alone_c[0], atol=1e-5)


# ---------------------------------------------------------------- the engine gives the old loop's numbers
def _old_train_routers(base, task, layers, granularity, cfg):
    """The router training loop of patchlm.depth.skip.train_routers as of af73a9d (checkpointing and the
    progress bar left out; the features come from data.features, where train.objectives moved)."""
    import math
    import random
    from contextlib import nullcontext

    from patchlm.data.features import build_features, objective_for
    from patchlm.depth.arch import check_indices, decoder_layers

    model = base.model
    n = len(decoder_layers(model))
    layers = check_indices(layers, n, "routed")
    objective = objective_for(task)
    feats = build_features(task, "train", base.tokenizer, objective, cfg.max_length, limit=cfg.samples)
    spec = {"layers": layers, "granularity": granularity, "hidden_size": int(model.config.hidden_size),
            "num_layers": n, "threshold": 0.5, "lambda": cfg.lam, "target": cfg.target, "lr": cfg.lr,
            "samples": len(feats), "objective": objective, "epochs": cfg.epochs, "max_length": cfg.max_length,
            "seed": cfg.seed}
    kind = RouterKind()
    torch.manual_seed(cfg.seed)
    kind.attach(model, spec, None)
    params = kind.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    rs = runtime.routers(model)
    order = list(range(len(feats)))
    steps = cfg.epochs * math.ceil(len(feats) / cfg.batch_size)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    hist = []
    model.train()
    step = 0
    for ep in range(cfg.epochs):
        random.Random(cfg.seed * 1009 + ep).shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            step += 1
            b = {k: v.to(device)
                 for k, v in old_collate([feats[i] for i in order[s: s + cfg.batch_size]], pad).items()}
            with ctx:
                lm, _ = old_causal_lm_loss(model, b)
            used = torch.stack([r.last_mask.float().mean() for r in rs.values()]).mean()
            cap = used if cfg.target is None else torch.relu(used - cfg.target)
            loss = lm.float() + cfg.lam * cap
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.append({"lm_loss": float(lm.detach()), "capacity": float(used.detach())})
    model.eval()
    assert step == steps
    return kind.state(model), hist, spec


@pytest.mark.parametrize(("granularity", "target", "bf16"), [("sequence", None, False), ("sequence", 0.5, False),
                                                             ("token", 0.25, True)])
def test_router_training_on_the_engine_equals_the_old_loop(tiny, toy_task, granularity, target, bf16):
    """Two epochs (the second reshuffles the first's order), a short last batch: identical router weights."""
    cfg = SkipConfig(samples=20, batch_size=8, epochs=2, lam=3.0, lr=0.05, target=target, bf16=bf16, seed=3)
    want, hist, spec = _old_train_routers(tiny, toy_task, [1, 2], granularity, cfg)
    RouterKind().detach(tiny.model)
    got = train_routers(tiny, toy_task, [1, 2], granularity, cfg)
    assert got.spec == spec and got.metrics["steps"] == len(hist) == 6
    assert set(got.tensors) == set(want)
    for k, v in want.items():
        assert torch.equal(got.tensors[k], v), k
    assert any(float(v.abs().sum()) > 0 for v in want.values())  # the routers did move
    tail = hist[-max(1, len(hist) // 10):]
    assert got.metrics["first_lm_loss"] == hist[0]["lm_loss"]
    assert got.metrics["final_capacity"] == sum(h["capacity"] for h in tail) / len(tail)


def test_planted_pickle_in_the_checkpoint_is_never_loaded(tiny, toy_task, tmp_path, monkeypatch):
    """A state.pt planted in OUT.ckpt (a pickle runs code when loaded) is ignored: resuming reads only the
    safetensors + JSON checkpoint, and a directory holding nothing else cannot be resumed."""
    import pickle

    from patchlm.errors import TrainingInterrupted

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    def refuse(*a, **k):
        raise AssertionError("torch.load / pickle.load must not be called on a router checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    planted = pickle.dumps({"step": 99, "evil": Payload()})
    cfg = SkipConfig(samples=16, batch_size=4, lam=2.0, lr=0.05)
    only_pickle = tmp_path / "only"
    only_pickle.mkdir()
    (only_pickle / "state.pt").write_bytes(planted)
    with pytest.raises(ConfigError, match=r"nothing to resume.*never loaded"):
        train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=only_pickle, resume=True)
    RouterKind().detach(tiny.model)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted):
        train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=ckpt, save_every=1, stop_after=2)
    RouterKind().detach(tiny.model)
    assert sorted(f.name for f in ckpt.iterdir()) == ["state.json", "state.safetensors"]
    (ckpt / "state.pt").write_bytes(planted)
    resumed = train_routers(tiny, toy_task, [2, 3], config=cfg, checkpoint_dir=ckpt, resume=True)
    assert resumed.metrics["steps"] == 4
    assert not marker.exists()
