"""The cost model: modelled seconds of a quantum linear solve, and the classical cost it is compared with.

Quantum (written once, here). The expected number of queries to the block encoding of A made by the quantum
linear-system algorithm of Jennings, Lostaglio, Pallister, Sornborger and Subasi, "Efficient quantum linear solver
algorithm with detailed running costs" (arXiv:2305.11352, 2023), the query bound Q-Newton's code uses:
    Q(kappa, eps, alpha) = (1741 alpha e / 500) sqrt(kappa^2 + 1) ((133/125 + 4 / (25 kappa^(1/3))) pi L + 1)
                         + (351/50) L^2 (ln(451 L^2 / eps) + 1) + alpha kappa ln(32 / eps),   L = ln(2 kappa + 3),
    expected queries = Q / (0.39 - 0.204 eps)       (the algorithm succeeds with probability >= 0.39 - 0.204 eps).
alpha enters Q once. Q-Newton's released code returns alpha Q / (0.39 - 0.204 eps), multiplying by alpha a second
time; we follow the published bound. alpha is the block encoding's normalisation: for a d-sparse matrix given by
sparse-access oracles it is d (entries scaled to at most 1), which is how the sparsity d enters the cost.
N enters through the gates per query: one query to a sparse-access oracle addresses a row and a column of an
N x N matrix, so we charge ceil(log2 N) gates per query (our modelling choice, a lower bound: the paper's
O(d kappa log(N kappa / eps)) scaling has the same log N factor; the code gives no gate count).
    modelled quantum seconds = expected queries(kappa, eps, alpha = d) x ceil(log2 N) x gate time.
These are modelled seconds of a machine that does not exist; the solve itself is computed classically.

Classical: the measured seconds of the LU solve of the same matrix on this machine, or modelled as
(2/3 N^3 + 2 N^2) flops at a rate timed once per process on a solve of size CALIBRATION_N.
"""

from __future__ import annotations

import math
import time

import torch

CALIBRATION_N = 384


def qlsa_queries(kappa: float, epsilon: float, alpha: float) -> float:
    """Expected queries of the Jennings et al. (2023) solver: Q(kappa, eps, alpha) / (0.39 - 0.204 eps)."""
    if not math.isfinite(kappa):
        return math.inf
    kappa = max(1.0, float(kappa))
    l2k = math.log(2 * kappa + 3)
    q = (1741 * alpha * math.e / 500) * math.sqrt(kappa ** 2 + 1) * (
        (133 / 125 + 4 / (25 * kappa ** (1 / 3))) * math.pi * l2k + 1) \
        + (351 / 50) * l2k ** 2 * (math.log(451 * l2k ** 2 / epsilon) + 1) \
        + alpha * kappa * math.log(32 / epsilon)
    return q / (0.39 - 0.204 * epsilon)


def gates_per_query(n: int) -> int:
    """Gates charged per oracle query on an N x N matrix: ceil(log2 N), at least 1."""
    return max(1, math.ceil(math.log2(max(2, int(n)))))


def quantum_seconds(kappa: float, epsilon: float, d: int, n: int, gate_time: float) -> float:
    """Modelled seconds of one quantum linear solve: queries(kappa, eps, alpha = d) x gates per query x gate time."""
    return qlsa_queries(kappa, epsilon, float(d)) * gates_per_query(n) * gate_time


def break_even_gate_time(classical_s: float, kappa: float, epsilon: float, d: int, n: int) -> float:
    """The gate time at which the modelled quantum solve takes as long as the classical one (0 when kappa is
    infinite): faster gates route the solve to the quantum solver."""
    per_gate = qlsa_queries(kappa, epsilon, float(d)) * gates_per_query(n)
    return classical_s / per_gate if math.isfinite(per_gate) else 0.0


def lu_flops(n: int) -> float:
    """Floating-point operations of an LU solve of one right-hand side: 2/3 N^3 + 2 N^2."""
    return 2 / 3 * n ** 3 + 2 * n ** 2


_RATE: list[float] = []


def classical_rate() -> float:
    """This machine's LU rate (flops per second), timed once per process (best of three solves of size
    CALIBRATION_N in float64)."""
    if not _RATE:
        g = torch.Generator().manual_seed(0)
        m = torch.randn(CALIBRATION_N, CALIBRATION_N, generator=g, dtype=torch.float64)
        a = m @ m.T + CALIBRATION_N * torch.eye(CALIBRATION_N, dtype=torch.float64)
        b = torch.randn(CALIBRATION_N, 1, generator=g, dtype=torch.float64)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            torch.linalg.solve(a, b)
            best = min(best, time.perf_counter() - t0)
        _RATE.append(lu_flops(CALIBRATION_N) / max(best, 1e-9))
    return _RATE[0]


def classical_seconds_modelled(n: int) -> float:
    """Modelled seconds of an LU solve of size N on this machine."""
    return lu_flops(n) / classical_rate()
