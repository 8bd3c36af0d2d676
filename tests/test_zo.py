"""Zeroth-order step rules against closed forms and their definitions, exact restore, blocks, sparsity, resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import killed_after

from patchlm.data.features import build_features, collate, pad_id
from patchlm.errors import ConfigError, UnknownNameError
from patchlm.train import TrainConfig, Trainer
from patchlm.train.engine import causal_lm_loss, make_closure
from patchlm.train.optim import make_optimizer
from patchlm.train.zo import Directions, Perturber


def _cfg(**kw):
    return TrainConfig(**{"lr": 1e-3, "steps": 4, "progress": False, **kw})


class _Quadratic:
    """f(theta) = 0.5 theta^T A theta - b^T theta, evaluated straight from the parameter (no module forward)."""

    def __init__(self, d=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = m @ m.T + d * torch.eye(d, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def closure(self, backward=False):
        t = self.theta
        return float(0.5 * t @ self.A @ t - self.b @ t)

    def grad(self):
        return (self.A @ self.theta.detach() - self.b)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_zo_estimate_is_the_directional_gradient_and_averages_to_the_gradient(distribution):
    q = _Quadratic()
    rule = make_optimizer("zo-sgd", [q.theta], _cfg(zo_eps=1e-3, zo_distribution=distribution))
    grad = q.grad()
    est = torch.zeros_like(grad)
    n = 4000
    for t in range(n):
        rule.t = t
        coeffs, _ = rule.estimate(q.closure)
        (step, query, g), = coeffs
        z = rule.dirs.z(0, step, query).double()
        applied = (rule.dirs.z(0, step, query) * 1e-3).double() / 1e-3  # eps z as the fp32 direction carries it
        # two-point differences are exact for a quadratic: g = grad . z (up to rounding)
        assert g == pytest.approx(float(grad @ applied), rel=1e-6, abs=1e-9 * float(grad.norm() * z.norm()))
        est += g * z
    est /= n
    # E[(grad . z) z] = grad for z ~ N(0, I) and for +-1 entries; the Monte-Carlo error is about |grad| * sqrt(d / n)
    assert float((est - grad).norm()) < 4 * float(grad.norm()) * math.sqrt(grad.numel() / n)


def test_one_sided_estimate_and_queries_average():
    q = _Quadratic()
    rule = make_optimizer("zo-sgd", [q.theta], _cfg(zo_eps=1e-4, zo_one_sided=True, zo_queries=3))
    coeffs, loss = rule.estimate(q.closure)
    assert len(coeffs) == 3 and loss == pytest.approx(q.closure())
    for step, query, c in coeffs:
        z = rule.dirs.z(0, step, query).double()
        assert 3 * c == pytest.approx(float(q.grad() @ z), rel=1e-2)


def _tiny_lora(tiny, toy_task, targets="attn"):
    from patchlm.patch import get_kind

    kind = get_kind("lora")
    kind.attach(tiny.model, {"r": 2, "alpha": 4, "targets": targets}, None, seed=0)
    params = kind.trainable_parameters(tiny.model)
    with torch.no_grad():
        for p in params:
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)  # B = 0 would make the first estimate trivially zero for A
    feats = build_features(toy_task, "train", tiny.tokenizer, "classification", 64)[:8]
    closure = make_closure(tiny.model, [collate(feats, pad_id(tiny.tokenizer))], causal_lm_loss, False)
    tiny.model.eval()
    return params, closure


def _full_params(tiny):
    params = [p for p in tiny.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("scheme", ["lora", "full"])
def test_theta_is_bit_identical_after_perturbed_evaluations(tiny, toy_task, scheme):
    params, closure = _tiny_lora(tiny, toy_task)
    if scheme == "full":
        from patchlm.patch import get_kind

        get_kind("lora").detach(tiny.model)
        params = _full_params(tiny)
    before = _snapshot(params)
    rule = make_optimizer("zo-sgd", params, _cfg(), model=tiny.model)
    if scheme == "full":
        assert len(rule.perturb.hooked) == len({id(p) for p in params})  # every tensor perturbed in its forward
    else:
        assert not rule.perturb.hooked  # adapter tensors: in place, restored from a copy
    l0 = closure(backward=False)
    with torch.no_grad():
        with rule.perturb.at([(0, 0, 1e-3)]):
            lp = closure(backward=False)
        with rule.perturb.at([(0, 0, -1e-3)]):
            lm = closure(backward=False)
    assert lp != l0 and lm != l0  # the perturbation reached the forward
    for a, b in zip(before, params):
        assert torch.equal(a, b.detach())
    assert closure(backward=False) == l0


def test_in_place_mezo_round_trip_is_not_exact_which_is_why_patchlm_does_not_use_it():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1_000_000, generator=g) * 0.02
    z = torch.randn(1_000_000, generator=g)
    a = t.clone()
    a.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    # the README and train/zo.py quote this: about half the elements (46% here) come back off by an ulp
    assert 0.4 < float((a != t).float().mean()) < 0.55


def test_zo_sgd_sign_follows_its_definition(tiny, toy_task):
    params, closure = _tiny_lora(tiny, toy_task)
    rule = make_optimizer("zo-sgd-sign", params, _cfg(lr=1e-2, zo_eps=1e-3), model=tiny.model)
    before = _snapshot(params)
    with torch.no_grad():
        with rule.perturb.at([(0, 0, 1e-3)]):
            lp = closure(backward=False)
        with rule.perturb.at([(0, 0, -1e-3)]):
            lm = closure(backward=False)
    g = (lp - lm) / 2e-3
    rule.step(closure)
    for i, (p, b) in enumerate(zip(params, before)):
        want = b - 1e-2 * torch.sign(g * rule.dirs.z(i, 0, 0))
        assert torch.allclose(p.detach(), want, atol=1e-7, rtol=0), i
        assert ((p.detach() - b).abs() - 1e-2).abs().max() < 1e-6 or g == 0  # every entry moved by lr


def test_zo_sgd_cons_keeps_the_best_of_three(tiny, toy_task):
    params, closure = _tiny_lora(tiny, toy_task)
    rule = make_optimizer("zo-sgd-cons", params, _cfg(lr=5.0, zo_eps=1e-3), model=tiny.model)
    before = _snapshot(params)
    coeffs, _ = rule.estimate(closure)
    rule.t = 0
    est = [rule.grad_estimate(i, coeffs) for i in range(len(params))]

    def loss_at(sign):
        with torch.no_grad():
            for p, b, e in zip(params, before, est):
                p.copy_(b + sign * 5.0 * e)
            v = closure(backward=False)
            for p, b in zip(params, before):
                p.copy_(b)
        return v

    cands = {0.0: loss_at(0.0), -1.0: loss_at(-1.0), 1.0: loss_at(1.0)}
    best = min(cands, key=cands.get)
    loss = rule.step(closure)
    assert rule.last_choice == best and loss == pytest.approx(cands[best], abs=1e-5)
    for p, b, e in zip(params, before, est):
        assert torch.allclose(p.detach(), b + best * 5.0 * e, atol=1e-6)


def test_forward_grad_equals_the_analytic_directional_derivative(tiny, toy_task):
    params, closure = _tiny_lora(tiny, toy_task)
    rule = make_optimizer("forward-grad", params, _cfg(), model=tiny.model)
    for p in params:
        p.requires_grad_(True)
    closure(backward=True)
    analytic = sum(float((p.grad * rule.dirs.z(i, 0, 0)).sum()) for i, p in enumerate(params))
    for p in params:
        p.grad = None
    coeffs, _ = rule.estimate(closure)
    assert coeffs[0][2] == pytest.approx(analytic, rel=1e-4, abs=1e-7)


def test_block_wise_perturbs_only_its_block(tiny, toy_task):
    params, _closure = _tiny_lora(tiny, toy_task, targets="all-linear")
    for mode, min_blocks in (("layer", 4), ("sublayer", 8), ("linear", 28)):
        rule = make_optimizer("zo-sgd", params, _cfg(zo_block=mode), model=tiny.model)
        assert len(rule.blocks) >= min_blocks, mode
        sub = set(rule.blocks[1])
        before = _snapshot(params)
        with torch.no_grad(), rule.perturb.at([(0, 0, 1e-2)], sub):
            changed = {i for i, (p, b) in enumerate(zip(params, before)) if not torch.equal(p.detach(), b)}
        assert changed == sub, mode
        rule.t = 1
        rule.update([(0, 0, 1.0)], rule.subset())
        moved = {i for i, (p, b) in enumerate(zip(params, before)) if not torch.equal(p.detach(), b)}
        assert moved == set(rule.blocks[1]), mode
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
    if True:  # layer blocks group the tensors of one decoder layer
        rule = make_optimizer("zo-sgd", params, _cfg(zo_block="layer"), model=tiny.model)
        for blk in rule.blocks:
            layers = {rule.names[i].split(".layers.")[1].split(".")[0] for i in blk}
            assert len(layers) == 1


@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_sparse_perturbs_exactly_the_asked_fraction(mode):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, 11, generator=g), torch.randn(100, generator=g)]
    d = Directions(["a", "b"], params, seed=3, sparsity=0.1, sparse_mode=mode)
    for i, p in enumerate(params):
        z = d.z(i, 5, 0)
        assert int((z != 0).sum()) == round(0.1 * p.numel())
        if mode == "magnitude":  # the smallest-magnitude entries
            chosen = p.abs()[z != 0].max()
            others = p.abs()[z == 0].min()
            assert chosen <= others


def test_hybrid_trains_chosen_layers_first_order(tiny, toy_task):
    params, closure = _tiny_lora(tiny, toy_task)
    rule = make_optimizer("zo-sgd", params, _cfg(zo_fo_layers="0-1", zo_fo_lr=1e-2), model=tiny.model)
    fo_ids = {id(p) for p in rule.fo}
    names = dict((id(p), n) for n, p in tiny.model.named_parameters())
    assert fo_ids and all(".layers.0." in names[i] or ".layers.1." in names[i] for i in fo_ids)
    assert all(".layers.0." not in n and ".layers.1." not in n for n in rule.names)
    before = {id(p): p.detach().clone() for p in params}
    rule.step(closure)
    assert all(not torch.equal(before[id(p)], p.detach()) for p in rule.fo)


def test_zo_training_resumes_exactly(toy_task, tmp_path):
    from patchlm.models import load_base

    spec = {"r": 2, "alpha": 4, "targets": "attn"}
    for opt, extra in (("zo-sgd", {"zo_sparsity": 0.3}), ("zo-adam", {}), ("zo-sgd-mmt", {"zo_one_sided": True})):
        cfg = TrainConfig(optimizer=opt, lr=1e-3, steps=6, save_every=3, batch_size=4, progress=False, eval_limit=4,
                          zo_block="layer", **extra)
        full = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg).run().tensors
        with killed_after(3):
            Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg, out_dir=tmp_path / opt).run()
        resumed = Trainer(load_base("tiny-random-llama"), "lora", dict(spec), toy_task, cfg, out_dir=tmp_path / opt,
                          resume=True).run().tensors
        for k in full:
            assert torch.equal(full[k], resumed[k]), (opt, k)


def test_zo_training_reports_forward_passes(tiny, toy_task, tmp_path):
    import json

    cfg = TrainConfig(optimizer="zo-sgd", lr=1e-3, steps=4, log_every=2, batch_size=4, progress=False, eval_limit=4)
    patch = Trainer(tiny, "lora", {"r": 2, "alpha": 4, "targets": "attn"}, toy_task, cfg, out_dir=tmp_path / "z").run()
    assert patch.metrics["forward_passes"] == 8  # two per step
    recs = [json.loads(x) for x in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    assert any("forward_passes" in r for r in recs)


def test_bad_zo_options_are_refused_by_field():
    with pytest.raises(UnknownNameError, match="zo-sgd"):
        make_optimizer("zo-sgdd", [torch.nn.Parameter(torch.zeros(2))], _cfg())
    for kw, fld in (({"zo_eps": 0.0}, "zo_eps"), ({"zo_eps": float("nan")}, "zo_eps"),
                    ({"zo_queries": 0}, "zo_queries"),
                    ({"zo_sparsity": 1.5}, "zo_sparsity"), ({"zo_sparsity": 0.0}, "zo_sparsity"),
                    ({"zo_block": "blocks"}, "zo_block"), ({"zo_fo_layers": "a-b"}, "zo_fo_layers")):
        with pytest.raises(ConfigError) as e:
            TrainConfig(**kw)
        assert e.value.field == fld


def test_block_mode_on_an_unknown_architecture_and_missing_hybrid_layers(tiny, toy_task):
    params, _ = _tiny_lora(tiny, toy_task)
    fake = SimpleNamespace(config=SimpleNamespace(model_type="opt"), named_parameters=tiny.model.named_parameters,
                           modules=tiny.model.modules)
    with pytest.raises(ConfigError, match="opt"):
        make_optimizer("zo-sgd", params, _cfg(zo_block="layer"), model=fake)
    make_optimizer("zo-sgd", params, _cfg(zo_block="linear"), model=fake)  # module blocks need no family names
    with pytest.raises(ConfigError, match=r"\[9\]"):
        make_optimizer("zo-sgd", params, _cfg(zo_fo_layers="1,9"), model=tiny.model)


def test_forward_grad_on_a_scheme_torch_func_cannot_differentiate(tiny, toy_task):
    params, closure = _tiny_lora(tiny, toy_task)
    rule = make_optimizer("forward-grad", params, _cfg(), model=tiny.model)

    def broken(params):
        raise RuntimeError("hooks are not supported by functorch")

    closure.functional = broken
    with pytest.raises(ConfigError, match=r"torch\.func"):
        rule.step(closure)


def test_perturber_restores_theta_even_when_the_forward_fails(tiny, toy_task):
    params, _closure = _tiny_lora(tiny, toy_task)
    from patchlm.patch import get_kind

    get_kind("lora").detach(tiny.model)
    params = _full_params(tiny)
    before = _snapshot(params)
    d = Directions([n for n, _ in tiny.model.named_parameters()], params, seed=0)
    pert = Perturber(tiny.model, params, d)
    with pytest.raises(ValueError), torch.no_grad(), pert.at([(0, 0, 1.0)]):
        tiny.model(input_ids=torch.tensor([[1, 2, 3]]))
        raise ValueError("boom")
    for a, p in zip(before, params):
        assert torch.equal(a, p.detach())
    assert all(isinstance(p, torch.nn.Parameter) for p in tiny.model.parameters())


def test_rademacher_directions_are_signs_seeded_and_balanced():
    from patchlm.train.zo import rademacher

    a = rademacher((1000, 37), torch.Generator().manual_seed(5))
    b = rademacher((1000, 37), torch.Generator().manual_seed(5))
    c = rademacher((1000, 37), torch.Generator().manual_seed(6))
    assert a.shape == (1000, 37) and a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 4 / math.sqrt(a.numel())  # fair signs (4 standard errors)
    # distinct entries are uncorrelated: the empirical second moment of a pair of columns is near 0
    assert abs(float((a[:, 0] * a[:, 1]).mean())) < 4 / math.sqrt(1000)
    with pytest.raises(ConfigError, match="zo_distribution"):
        make_optimizer("zo-sgd", [torch.nn.Parameter(torch.zeros(3))], _cfg(zo_distribution="uniform"))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_accumulate_equals_adding_each_direction_in_turn(distribution):
    from patchlm.train.zo import Directions

    params = [torch.randn(5, 7), torch.randn(13)]
    dirs = Directions(["a", "b"], params, seed=3, sparsity=0.5, sparse_mode="random", distribution=distribution)
    coeffs = [(0, 0, 0.5), (7, 1, -1.25), (2, 0, 3.0)]
    for i, p in enumerate(params):
        for dtype in (torch.float64, torch.float32):
            want = torch.zeros(p.shape, dtype=dtype)
            for step, query, c in coeffs:
                want.add_(dirs.z(i, step, query).to(dtype), alpha=c)
            got = dirs.accumulate(i, coeffs, torch.zeros(p.shape, dtype=dtype))
            assert got.dtype == dtype and torch.equal(got, want)
        assert int((dirs.accumulate(i, coeffs, torch.zeros(p.shape)) != 0).sum()) <= round(0.5 * p.numel())
