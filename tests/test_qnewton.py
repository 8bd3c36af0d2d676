"""Q-Newton: the query cost against hand-computed values, the condition-number bound (14.93 on [[1, 2], [3, 4]],
above the true kappa on random SPD matrices), the cost model and scheduler, re-pricing, and head training."""

from __future__ import annotations

import math

import pytest
import torch

import patchlm.qnewton  # noqa: F401  (registers the qnewton solver)
from patchlm.qnewton.condition import (
    gershgorin_kappa,
    gram_kappa,
    kappa_bound,
    kappa_estimate,
    kappa_exact,
    kappa_pair,
    log_kappa_bound,
)
from patchlm.qnewton.cost import break_even_gate_time, gates_per_query, qlsa_queries, quantum_seconds
from patchlm.qnewton.heads import accuracy, make_head, train_head
from patchlm.qnewton.scheduler import QNewtonSolver, reprice, route
from patchlm.train import TrainConfig
from patchlm.train.newton import GATE_TIMES, LinearSystem, gate_seconds


# Hand computation of Jennings et al.'s expected queries, term by term (L = ln(2 kappa + 3)):
#   t1 = (1741 alpha e / 500) sqrt(kappa^2 + 1) ((133/125 + 4 / (25 kappa^(1/3))) pi L + 1)
#   t2 = (351/50) L^2 (ln(451 L^2 / eps) + 1),   t3 = alpha kappa ln(32 / eps),
#   Q = (t1 + t2 + t3) / (0.39 - 0.204 eps)
# kappa 1, eps 0.1, alpha 1:   L = ln 5 = 1.609438; t1 = 9.46518 x 1.414214 x 7.188748 = 96.2263;
#   t2 = 7.02 x 2.590290 x 10.365827 = 188.4904; t3 = ln 320 = 5.7683; sum 290.4851 / 0.3696 = 785.944
# kappa 10, eps 0.01, alpha 1: L = ln 23 = 3.135494; t1 = 1161.6779; t2 = 966.3751; t3 = 10 ln 3200 = 80.7091;
#   sum 2208.7621 / 0.3880 = 5693.273
# kappa 100, eps 0.001, alpha 4: L = ln 203 = 5.313206; t1 = 73208.6815; t2 = 3440.2537; t3 = 400 ln 32000 = 4149.3965;
#   sum 80798.3317 / 0.389796 = 207283.635
@pytest.mark.parametrize("kappa, eps, alpha, expected", [(1, 0.1, 1, 785.944), (10, 0.01, 1, 5693.273),
                                                         (100, 1e-3, 4, 207283.635)])
def test_query_cost_equals_hand_computed_values(kappa, eps, alpha, expected):
    assert qlsa_queries(kappa, eps, alpha) == pytest.approx(expected, rel=1e-6)


def test_query_cost_has_alpha_once_not_twice():
    # the released code returns alpha * Q: with alpha 4 that would be ~4x our value; the alpha-free terms keep
    # Q(alpha=4) below 4 Q(alpha=1)
    assert qlsa_queries(100, 1e-3, 4) < 4 * qlsa_queries(100, 1e-3, 1)
    assert qlsa_queries(100, 1e-3, 4) > qlsa_queries(100, 1e-3, 1)


def test_modelled_quantum_seconds_and_break_even():
    q = qlsa_queries(50, 0.01, 8)
    assert gates_per_query(1000) == 10 and gates_per_query(1024) == 10 and gates_per_query(1) == 1
    assert quantum_seconds(50, 0.01, 8, 1000, 1e-9) == pytest.approx(q * 10 * 1e-9)
    t = break_even_gate_time(0.5, 50, 0.01, 8, 1000)
    assert quantum_seconds(50, 0.01, 8, 1000, t) == pytest.approx(0.5)
    assert route(0.5, 50, 0.01, 8, 1000, t * 0.9)["route"] == "quantum"
    assert route(0.5, 50, 0.01, 8, 1000, t * 1.1)["route"] == "classical"
    assert route(0.5, math.inf, 0.01, 8, 1000, 1e-30)["route"] == "classical"


def test_kappa_bound_is_exact_on_the_published_2x2_example():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert kappa_bound(a) == pytest.approx(14.93, abs=5e-3)
    assert kappa_bound(a) == pytest.approx(kappa_exact(a), rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 20, 80])
def test_kappa_bound_is_at_least_the_true_kappa_on_random_spd_matrices(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(10):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        a = m @ m.T + (10.0 ** -trial) * torch.eye(n, dtype=torch.float64)
        assert kappa_bound(a) >= kappa_exact(a) * (1 - 1e-9)


def test_kappa_bound_in_logs_survives_an_underflowing_determinant_and_is_inf_when_singular():
    a = 1e-3 * torch.eye(400, dtype=torch.float64)  # det = 1e-1200 underflows; kappa is 1
    assert math.isfinite(log_kappa_bound(a)) and kappa_bound(a) == pytest.approx(1.0)
    assert kappa_bound(torch.zeros(3, 3)) == math.inf
    assert kappa_bound(torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == math.inf


def test_kappa_pair_before_and_after_a_shift():
    h = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    assert kappa_pair(h, 0.0, exact=True) == pytest.approx((100.0, 100.0))
    kb, ka = kappa_pair(h, 0.9, exact=True)
    assert kb == pytest.approx(100.0) and ka == pytest.approx(10.9 / 1.0)
    bb, ba = kappa_pair(h, 0.9, exact=False)
    assert bb >= kb * (1 - 1e-9) and ba >= ka * (1 - 1e-9)


@pytest.mark.parametrize("b, n", [(5, 30), (30, 30), (40, 12)])
def test_gram_kappa_of_a_fisher_equals_the_exact_one(b, n):
    # F = G^T G / B (+ w I): from the B x B Gram matrix, exact whether B < N (F singular) or not
    g = torch.Generator().manual_seed(b + n)
    factor = torch.randn(b, n, generator=g, dtype=torch.float64) / math.sqrt(b)
    f = factor.T @ factor
    for w, s in ((0.0, 0.1), (0.01, 0.5)):
        kb, ka = gram_kappa(factor, w, s)
        eye = torch.eye(n, dtype=torch.float64)
        assert ka == pytest.approx(kappa_exact(f + (w + s) * eye), rel=1e-8)
        if b < n and w == 0:
            assert kb == math.inf
        else:
            assert kb == pytest.approx(kappa_exact(f + w * eye), rel=1e-6)


def test_kappa_estimate_methods_and_the_clamped_bound():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(8, 300, generator=g, dtype=torch.float64) / math.sqrt(8)
    f = factor.T @ factor
    shift = 5e-3 * float(f.abs().max())
    kb, ka, method = kappa_estimate(f, shift, 1024, factor)
    assert method == "gram" and kb == math.inf
    assert ka == pytest.approx(kappa_exact(f + shift * torch.eye(300, dtype=torch.float64)), rel=1e-8)
    assert kappa_estimate(f, shift, 1024)[2] == "exact"
    _, ka2, method = kappa_estimate(f, shift, 100)
    assert method == "bound" and ka2 >= ka * (1 - 1e-9)
    # the published bound alone overflows at this size; Gershgorin's clamps it once the matrix is dominant
    big = f + 50 * shift * torch.eye(300, dtype=torch.float64)
    assert kappa_bound(big) == math.inf or kappa_bound(big) > 1e6 * kappa_exact(big)
    assert math.isfinite(kappa_estimate(big, 0.0, 100)[1])
    assert kappa_estimate(big, 0.0, 100)[1] >= kappa_exact(big) * (1 - 1e-9)


def test_gershgorin_kappa_bounds_diagonally_dominant_matrices():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        m = torch.randn(20, 20, generator=g, dtype=torch.float64) * 0.1
        a = (m + m.T) / 2 + 3 * torch.eye(20, dtype=torch.float64)
        assert gershgorin_kappa(a) >= kappa_exact(a) * (1 - 1e-12)
    assert gershgorin_kappa(torch.ones(3, 3, dtype=torch.float64)) == math.inf


def test_a_bound_above_the_kappa_limit_does_not_stop_training():
    # only an exact kappa proves a matrix singular: a loose bound goes on to LU, whose pivots decide
    s = _system(n=40)
    solver = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton", newton_kappa_exact=10,
                                       newton_kappa_limit=1e4))
    x, rec = solver.solve(s)  # exact kappa 1.4e3
    assert rec["kappa_method"] == "bound" and rec["kappa_after"] > 1e4
    assert torch.allclose(x, torch.linalg.solve(s.regularized(), s.grad))


def test_gate_time_presets_and_numbers():
    assert gate_seconds("paper") == GATE_TIMES["paper"] == 1e-18
    assert gate_seconds("today") == GATE_TIMES["today"]
    assert gate_seconds("2.5e-9") == 2.5e-9


def _system(n=6, seed=0, shift=0.1):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return LinearSystem("w", m @ m.T, shift, torch.randn(n, generator=g, dtype=torch.float64), n, 0, 0.01)


def test_scheduler_routes_by_gate_time_and_solves_the_same_system_either_way():
    s = _system()
    fast = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton", newton_gate_time="1e-30"))
    slow = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton", newton_gate_time="1"))
    xq, rq = fast.solve(s)
    xc, rc = slow.solve(s)
    assert rq["route"] == "quantum" and rc["route"] == "classical"
    expect = torch.linalg.solve(s.regularized(), s.grad)
    assert torch.allclose(xq, expect) and torch.allclose(xc, expect)
    assert rq["modelled_s"] == pytest.approx(rq["quantum_s"]) and rc["modelled_s"] == rc["solve_s"]
    kb, ka = kappa_pair(s.matrix, s.shift, exact=True)
    assert rq["kappa_before"] == pytest.approx(kb) and rq["kappa_after"] == pytest.approx(ka) and ka < kb
    assert rq["breakeven_gate_s"] == pytest.approx(rq["classical_s"] / (qlsa_queries(ka, 0.01, 6) * 3))


def test_scheduler_reuses_kappa_between_estimates():
    solver = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton", newton_kappa_every=3))
    recs = []
    for step in range(4):
        s = _system(seed=step)
        s.step = step
        recs.append(solver.solve(s)[1])
    assert [r["kappa_estimated"] for r in recs] == [True, False, False, True]
    assert recs[1]["kappa_after"] == recs[0]["kappa_after"]


def test_scheduler_refuses_a_singular_matrix_with_kappa_and_lambda():
    from patchlm.errors import ConfigError

    s = LinearSystem("w", torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), 0.0,
                     torch.ones(2, dtype=torch.float64), 2, 0, 0.0)
    solver = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton"))
    with pytest.raises(ConfigError, match=r"condition number inf; newton_lambda >= ") as e:
        solver.solve(s)
    assert e.value.field == "newton_lambda"


def test_reprice_matches_the_live_scheduler():
    recs = []
    solver = QNewtonSolver(TrainConfig(optimizer="newton", newton_solver="qnewton", newton_gate_time="1e-12"))
    for seed in range(3):
        recs.append(solver.solve(_system(n=40, seed=seed))[1])
    live = sum(r["modelled_s"] for r in recs)
    again = reprice(sum(r["solve_s"] for r in recs), recs, 1e-12, 0.01)
    assert again["quantum_solves"] == sum(r["route"] == "quantum" for r in recs)
    assert again["modelled_s"] == pytest.approx(live)


def test_newton_head_training_on_separable_data_reaches_adams_accuracy_in_fewer_steps():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 16), dim=-1)
    y = (x @ torch.randn(16, 3)).argmax(-1)
    acc = {}
    for name, kw, steps in (("adamw", {"lr": 1e-2}, 60), ("newton", {"lr": 1.0, "newton_solver": "qnewton"}, 6)):
        head = make_head("linear", 16, 3)
        curve = []
        cfg = TrainConfig(optimizer=name, steps=steps, progress=False, max_grad_norm=0, schedule="constant",
                          warmup=0, **kw)
        rule = train_head(head, x, y, cfg, on_step=lambda r, i, head=head, curve=curve:
                          curve.append(accuracy(head, x, y)))
        acc[name] = curve
        if name == "newton":
            m = rule.metrics()
            assert m["newton_solves"] == 2 * steps  # weight and bias blocks
            assert m["newton_measured_s"] > 0 and m["newton_kappa_after"] >= 1
    target = acc["adamw"][-1]
    assert max(acc["newton"]) >= target
    first = next(i for i, a in enumerate(acc["newton"]) if a >= target)
    assert first + 1 < len(acc["adamw"])


def test_mlp_head_with_row_blocks_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] * x[:, 1] > 0).long()
    head = make_head("mlp", 8, 2, hidden=4)
    before = accuracy(head, x, y)
    cfg = TrainConfig(optimizer="newton", steps=8, lr=0.5, progress=False, newton_block="row", newton_lambda=1e-2,
                      schedule="constant", warmup=0)
    rule = train_head(head, x, y, cfg)
    m = rule.metrics()
    # 8 blocks a step (4 + 2 weight rows, 2 biases); a row whose tanh unit saturated has a zero gradient and no solve
    assert m["newton_solves"] + m["newton_zero_gradient_blocks"] == 8 * (4 + 1 + 2 + 1)
    assert m["newton_solves"] >= 8 * 7
    assert accuracy(head, x, y) > before
