"""The Newton step rule: one step on a quadratic, Fisher and Hessian matrices, blocks, sparsity, fallback,
bad input (singular matrix, block too large, d > N), resume, and patchlm train --optimizer newton."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from patchlm.errors import ConfigError
from patchlm.train import TrainConfig
from patchlm.train.engine import make_closure
from patchlm.train.newton import LinearSystem, classical_solve, lambda_to_fix, make_blocks, sparsify
from patchlm.train.optim import make_optimizer


def _cfg(**kw):
    return TrainConfig(**{"optimizer": "newton", "lr": 1.0, "steps": 1, "progress": False, "max_grad_norm": 0.0,
                          "newton_lambda": 0.0, **kw})


class _Quad(torch.nn.Module):
    """f(theta) = 0.5 theta^T A theta - b^T theta (A SPD), float64; the minimum is A^-1 b."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = m @ m.T + torch.eye(d, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, batch):
        t = self.theta
        return 0.5 * t @ self.A @ t - self.b @ t


def _quad_loss(model, batch):
    return model(batch), 1


def _step(model, rule, batch):
    closure = make_closure(model, [batch], _quad_loss, False, count=lambda b: 1)
    return rule.step(closure)


def test_newton_with_the_exact_hessian_minimises_a_quadratic_in_one_step():
    q = _Quad()
    rule = make_optimizer("newton", [q.theta], _cfg(newton_matrix="hessian"), model=q)
    _step(q, rule, {"x": torch.zeros(1)})
    best = torch.linalg.solve(q.A, q.b)
    assert torch.allclose(q.theta.detach(), best, atol=1e-10)
    assert rule.metrics()["newton_solves"] == 1


def test_max_step_caps_the_norm_of_each_block_step_and_is_counted():
    q = _Quad()
    start = q.theta.detach().clone()
    full = torch.linalg.solve(q.A, q.b) - start
    cap = 0.25 * float(full.norm())
    rule = make_optimizer("newton", [q.theta], _cfg(newton_matrix="hessian", newton_max_step=cap), model=q)
    _step(q, rule, {"x": torch.zeros(1)})
    moved = q.theta.detach() - start
    assert abs(float(moved.norm()) - cap) < 1e-9  # capped to the trust region
    assert torch.allclose(moved / moved.norm(), full / full.norm(), atol=1e-10)  # along the Newton direction
    assert rule.metrics()["newton_capped_blocks"] == 1


def test_empirical_fisher_is_the_mean_of_per_example_gradient_outer_products():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"]), 1

    def traced_loss(model, batch):  # data-dependent control flow: vmap cannot batch it, the rule loops instead
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        return (loss if float(batch["y"].sum()) >= 0 else -loss), 1

    per = []
    for i in range(5):
        lin.weight.grad = None
        loss_fn(lin, {"x": x[i:i + 1], "y": y[i:i + 1]})[0].backward()
        per.append(lin.weight.grad.reshape(-1).double())
    g = torch.stack(per)
    # two micro-batches (3 + 2 examples): the Fisher spans the step's examples
    micro = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    for fn, vmapped, forwards in ((loss_fn, True, 2), (traced_loss, False, 5)):
        rule = make_optimizer("newton", [lin.weight], _cfg(), model=lin)
        closure = make_closure(lin, micro, fn, False, count=lambda b: 1)
        (fisher,), (factor,) = rule._fisher(closure)
        assert rule.vmap is vmapped
        assert torch.allclose(fisher, g.T @ g / 5, atol=1e-12)
        assert torch.allclose(factor.T @ factor, fisher, atol=1e-12) and factor.shape == (5, 6)
        assert closure.forwards == forwards  # vmap: one batched pass per micro-batch; else one per example


def test_newton_on_least_squares_with_the_fisher_of_a_linear_model_matches_gauss_newton():
    # for squared error 0.5 (w.x - y)^2 per example, g_i = r_i x_i: the Fisher is mean r_i^2 x_i x_i^T
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1, bias=False).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)

    def loss_fn(model, batch):
        return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).mean(), 1

    rule = make_optimizer("newton", [lin.weight], _cfg(newton_lambda=1e-3), model=lin)
    w0 = lin.weight.detach().clone().reshape(-1)
    r = (x @ w0 - y.squeeze(1))
    fisher = (x * r[:, None]).T @ (x * r[:, None]) / 16
    g = (x * r[:, None]).mean(0)
    expect = w0 - torch.linalg.solve(fisher + 1e-3 * fisher.abs().max() * torch.eye(4, dtype=torch.float64), g)
    rule.step(make_closure(lin, [{"x": x, "y": y}], loss_fn, False, count=lambda b: 1))
    assert torch.allclose(lin.weight.detach().reshape(-1), expect, atol=1e-9)


def test_sparsify_keeps_at_most_d_per_row_symmetric_with_the_diagonal():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    h = m @ m.T
    s = sparsify(h, 3)
    assert torch.equal(s, s.T)
    assert int((s != 0).sum(1).max()) <= 3
    assert torch.equal(s.diagonal(), h.diagonal())
    assert torch.equal(sparsify(h, 8), h)


def test_blocks_tensor_row_module_all():
    lin = torch.nn.Linear(3, 2)
    names = ["weight", "bias"]
    params = [lin.weight, lin.bias]
    assert [b.n for b in make_blocks(names, params, "tensor")] == [6, 2]
    assert [(b.name, b.n) for b in make_blocks(names, params, "row")] == [("weight[0]", 3), ("weight[1]", 3),
                                                                          ("bias", 2)]
    assert [b.n for b in make_blocks(["l.weight", "l.bias"], params, "module")] == [8]
    assert [b.n for b in make_blocks(names, params, "all")] == [8]


def test_row_blocks_with_the_hessian_solve_each_row_of_a_quadratic():
    # f(W) = 0.5 sum_r w_r^T A w_r - b_r . w_r: rows are independent, so row blocks reach the minimum in one step
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))

        def forward(self, batch):
            return 0.5 * torch.einsum("ri,ij,rj->", self.w, a, self.w) - (b * self.w).sum()

    mod = M()
    rule = make_optimizer("newton", [mod.w], _cfg(newton_matrix="hessian", newton_block="row"), model=mod)
    _step(mod, rule, {"x": torch.zeros(1)})
    assert torch.allclose(mod.w.detach(), torch.linalg.solve(a, b.T).T, atol=1e-10)
    assert rule.metrics()["newton_solves"] == 3


def test_blocks_above_the_limit_fall_back_to_sgd_with_one_log_line(caplog):
    lin = torch.nn.Linear(3, 2)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"]), 1

    with caplog.at_level("WARNING", logger="patchlm.train.newton"):
        rule = make_optimizer("newton", [lin.weight, lin.bias], _cfg(newton_max_block=4, newton_fallback_lr=0.5,
                                                                      newton_lambda=1e-2), model=lin)
    assert len([r for r in caplog.records if "first-order" in r.getMessage()]) == 1
    lin.weight.grad = None
    loss_fn(lin, {"x": x, "y": y})[0].backward()
    gw = lin.weight.grad.clone()
    lin.zero_grad()
    rule.step(make_closure(lin, [{"x": x, "y": y}], loss_fn, False, count=lambda b: 1))
    assert torch.allclose(lin.weight.detach(), w0 - 0.5 * gw, atol=1e-7)  # the 6-parameter weight: SGD
    assert not torch.equal(lin.bias.detach(), b0)  # the bias: a Newton step
    assert rule.metrics()["newton_solves"] == 1


def test_block_too_large_without_fallback_is_refused_by_field():
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="newton_max_block 4") as e:
        make_optimizer("newton", [lin.weight], _cfg(newton_max_block=4, newton_fallback=False), model=lin)
    assert e.value.field == "newton_max_block"


def test_sparsity_larger_than_every_block_is_refused():
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="d=7 exceeds N=6") as e:
        make_optimizer("newton", [lin.weight, lin.bias], _cfg(newton_sparsity=7), model=lin)
    assert e.value.field == "newton_sparsity"


@pytest.mark.parametrize("kw, field", [
    ({"newton_gate_time": "0"}, "newton_gate_time"), ({"newton_gate_time": "-1e-9"}, "newton_gate_time"),
    ({"newton_gate_time": "fast"}, "newton_gate_time"), ({"newton_epsilon": 0.0}, "newton_epsilon"),
    ({"newton_epsilon": 1.0}, "newton_epsilon"), ({"newton_sparsity": -1}, "newton_sparsity"),
    ({"newton_lambda": -0.1}, "newton_lambda"), ({"newton_matrix": "gauss"}, "newton_matrix"),
    ({"newton_block": "layer"}, "newton_block"), ({"newton_classical": "guess"}, "newton_classical"),
    ({"newton_kappa_every": 0}, "newton_kappa_every"), ({"newton_max_step": -1.0}, "newton_max_step"),
    ({"newton_max_step": float("nan")}, "newton_max_step"),
])
def test_bad_newton_options_name_their_field(kw, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig(optimizer="newton", **kw)
    assert e.value.field == field


def test_a_singular_matrix_after_regularisation_reports_kappa_and_the_lambda_that_fixes_it():
    h = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    system = LinearSystem("w", h, 0.0, torch.ones(3, dtype=torch.float64), 3, 0, 0.0)
    with pytest.raises(ConfigError, match=r"block w .*singular.*condition number .*newton_lambda >= ") as e:
        classical_solve(system, 1e12)
    assert e.value.field == "newton_lambda"
    lam = lambda_to_fix(h, 4.0, 1e3)
    fixed = h + lam * 4.0 * torch.eye(3, dtype=torch.float64)
    assert float(torch.linalg.cond(fixed)) == pytest.approx(1e3, rel=1e-6)


def test_newton_on_a_rank_deficient_fisher_without_lambda_stops_with_one_message():
    lin = torch.nn.Linear(3, 2, bias=False)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])  # 2 examples: a rank-2 Fisher of a 6-parameter block

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"]), 1

    rule = make_optimizer("newton", [lin.weight], _cfg(newton_lambda=0.0), model=lin)
    with pytest.raises(ConfigError, match="singular after regularisation"):
        rule.step(make_closure(lin, [{"x": x, "y": y}], loss_fn, False, count=lambda b: 1))


def test_unknown_solver_is_refused_with_the_choices():
    from patchlm.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="newton_solver 'quantumish'"):
        TrainConfig(optimizer="newton", newton_solver="quantumish")


def _lora_newton_argv(out, steps: int) -> list[str]:
    return ["train", "--model", "tiny-random-llama", "--task", "sms_spam", "--max-examples", "24", "--method",
            "lora", "--rank", "1", "--optimizer", "newton", "--lr", "0.5", "--newton-solver", "qnewton",
            "--newton-gate-time", "paper", "--batch-size", "4", "--steps", str(steps), "--log-every", "1",
            "--save-every", "1", "--out", str(out), "--quiet", "--warmup", "0"]


def test_patchlm_train_optimizer_newton_lora_logs_newton_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(_lora_newton_argv(out, 2), capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in recs if "newton_solves" in r]
    assert [r["step"] for r in logs] == [1, 2]
    assert logs[-1]["newton_solves"] > 0 and 0 <= logs[-1]["newton_quantum_fraction"] <= 1
    assert logs[-1]["newton_modelled_s"] > 0 and logs[-1]["newton_kappa_after"] >= 1
    patch = json.loads((out / "patch" / "patch.json").read_text())
    assert patch["metrics"]["newton_solves"] == logs[-1]["newton_solves"]
    # resuming continues the totals from the checkpoint
    code, _, err = run_cli([*_lora_newton_argv(out, 3), "--resume"], capsys)
    assert code == 0, err
    patch = json.loads((out / "patch" / "patch.json").read_text())
    assert patch["metrics"]["newton_solves"] > logs[-1]["newton_solves"]


@pytest.mark.parametrize("flags, needle", [
    (["--newton-gate-time", "0"], "newton_gate_time must be a positive"),
    (["--newton-epsilon", "1.5"], "in (0, 1)"),
    (["--newton-max-block", "4", "--no-newton-fallback"], "newton_fallback is off"),
    (["--newton-sparsity", "100000"], "exceeds N="),
])
def test_patchlm_train_bad_newton_input_exits_2_with_one_line(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", "tiny-random-llama", "--task", "sms_spam", "--max-examples", "24",
                            "--batch-size", "4", "--rank", "1", "--optimizer", "newton", "--steps", "1", "--out",
                            str(out), "--quiet", *flags], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists()  # refused before anything was written


def test_qnewton_solver_is_found_in_a_fresh_process_through_its_entry_point():
    # the engine never imports patchlm.qnewton: TrainConfig's check (what `patchlm train --newton-solver qnewton`
    # runs first) finds it through the patchlm.newton_solvers entry point (pyproject.toml), in a process that never
    # imported it (the CLI run itself is test_patchlm_train_optimizer_newton_lora_logs_newton_metrics_and_resumes)
    import subprocess
    import sys

    code = ("import sys, patchlm.cli.main\n"
            "from patchlm.train import TrainConfig\n"
            "from patchlm.train.newton import solver_class\n"
            "assert 'patchlm.qnewton' not in sys.modules\n"
            "TrainConfig(optimizer='newton', newton_solver='qnewton')\n"
            "assert solver_class('qnewton').__module__ == 'patchlm.qnewton.scheduler'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
