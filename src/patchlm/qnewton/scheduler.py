"""The Q-Newton scheduler: a Newton solver (newton_solver = "qnewton") that estimates each block's condition
number, models the quantum solve's time and routes the solve to the cheaper of the two.

Per solve: kappa of the matrix before and after regularisation (condition.kappa_estimate: exact and cheap from
the examples' Gram matrix for a dense Fisher of fewer examples than parameters, exact from eigenvalues up to
newton_kappa_exact, else the published bound clamped by Gershgorin's, labelled "bound"; re-estimated every
newton_kappa_every steps and reused in between: the estimate is classical work, counted in the measured time);
the classical cost (the timed LU of the matrix, or its N^3 model);
the modelled quantum cost (patchlm.qnewton.cost) at newton_gate_time and newton_epsilon with the block's sparsity
d; the cheaper route wins. The solution is computed classically on either route (the quantum solve is
simulated; its epsilon error is not added). Q-Newton's released code defines a scheduler but never calls it.
"""

from __future__ import annotations

import math
import time

from patchlm.qnewton.condition import kappa_estimate
from patchlm.qnewton.cost import break_even_gate_time, classical_seconds_modelled, quantum_seconds
from patchlm.train.newton import LinearSystem, Solver, classical_solve, gate_seconds, register_solver, singular_error


def route(classical_s: float, kappa: float, epsilon: float, d: int, n: int, gate_time: float) -> dict:
    """The scheduler's decision for one solve: route ('quantum' when its modelled time is below the classical
    cost), the modelled quantum seconds, and the break-even gate time of this solve."""
    q = quantum_seconds(kappa, epsilon, d, n, gate_time)
    return {"route": "quantum" if q < classical_s else "classical", "quantum_s": q,
            "breakeven_gate_s": break_even_gate_time(classical_s, kappa, epsilon, d, n)}


def reprice(wall_s: float, records: list[dict], gate_time: float, epsilon: float) -> dict:
    """One step's times at another gate time, from its solve records: the training trajectory does not depend on
    the route (both compute the same solution), so one run prices every gate time. measured = the step's wall
    time minus the solves routed to the quantum solver; modelled = measured + their modelled seconds."""
    away, modelled_q = 0.0, 0.0
    nq = 0
    for r in records:
        dec = route(r["classical_s"], r["kappa_after"], epsilon, r["d"], r["n"], gate_time)
        if dec["route"] == "quantum":
            nq += 1
            away += r["solve_s"]
            modelled_q += dec["quantum_s"]
    measured = wall_s - away
    return {"measured_s": measured, "modelled_s": measured + modelled_q, "quantum_solves": nq,
            "solves": len(records)}


@register_solver("qnewton")
class QNewtonSolver(Solver):
    """Routes each block's solve to the cheaper of LU here and the modelled quantum solver."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = gate_seconds(config.newton_gate_time)
        self.eps = float(config.newton_epsilon)
        self.measured = config.newton_classical == "measured"
        self.exact_limit = int(config.newton_kappa_exact)
        self.every = int(config.newton_kappa_every)
        self.kappas: dict[str, list[float]] = {}  # block -> [kappa before, kappa after] at the last estimate
        self.methods: dict[str, str] = {}         # block -> how that estimate was made (gram | exact | bound)

    def solve(self, system: LinearSystem):
        overhead = 0.0
        if system.step % self.every == 0 or system.name not in self.kappas:
            t0 = time.perf_counter()
            kb, ka, method = kappa_estimate(system.matrix, system.shift, self.exact_limit, system.factor,
                                            system.diag_shift)
            overhead = time.perf_counter() - t0
            self.kappas[system.name] = [kb, ka]
            self.methods[system.name] = method
            if method != "bound" and (not math.isfinite(ka) or ka > self.kappa_limit):
                raise singular_error(system, ka, self.kappa_limit)  # a bound proves nothing: LU's pivots decide
        kb, ka = self.kappas[system.name]
        x, sec = classical_solve(system, self.kappa_limit)
        classical = sec if self.measured else classical_seconds_modelled(system.n)
        dec = route(classical, ka, self.eps, system.d, system.n, self.gate)
        quantum = dec["route"] == "quantum"
        return x, {"route": dec["route"], "n": system.n, "d": system.d, "solve_s": sec, "classical_s": classical,
                   "quantum_s": dec["quantum_s"], "modelled_s": dec["quantum_s"] if quantum else sec,
                   "overhead_s": overhead, "kappa_before": kb, "kappa_after": ka,
                   "breakeven_gate_s": dec["breakeven_gate_s"], "kappa_estimated": overhead > 0,
                   "kappa_method": self.methods.get(system.name, "bound")}

    def state_dict(self) -> dict:
        """The last condition-number estimates (reused between estimates; JSON has no inf: -1 stands for it)."""
        return {"kappas": {k: [v if math.isfinite(v) else -1.0 for v in pair] for k, pair in self.kappas.items()},
                "methods": dict(self.methods)}

    def load_state_dict(self, state: dict) -> None:
        self.kappas = {k: [float(v) if v >= 0 else math.inf for v in pair]
                       for k, pair in state.get("kappas", {}).items()}
        self.methods = dict(state.get("methods", {}))
