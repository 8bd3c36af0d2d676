"""Condition numbers of the Newton matrices: exact from singular values, or the published upper bound from the
Frobenius norm and the determinant (cheap to read off an LU or Cholesky factorisation, so large blocks get it).

Bound (Merikoski, Urpala, Virtanen and Tam, "A best upper bound for the 2-norm condition number of a matrix",
Linear Algebra Appl. 254, 1997): for a nonsingular n x n matrix A,
    x = sqrt(1 - (n / ||A||_F^2)^n |det A|^2),    kappa(A) <= sqrt((1 + x) / (1 - x)).
It is exact for n = 2: on [[1, 2], [3, 4]] it gives 14.93, the true kappa. Q-Newton's released code writes
(1 - n / ||A||_F)^n for (n / ||A||_F^2)^n and returns NaN on its own docstring example; we use the published form.
Computed in logs: with y = (n / ||A||_F^2)^n |det A|^2 = 1 - x^2 (0 < y <= 1 by the AM-GM inequality on the
squared singular values), sqrt((1 + x) / (1 - x)) = (1 + x) / sqrt(y), so log kappa <= log(1 + x) - log(y) / 2
stays finite for matrices whose determinant under- or overflows.

The bound is loose for large N: y is a ratio of the geometric to the arithmetic mean of the n squared singular
values, raised to the n-th power, so on a Newton matrix of a few hundred parameters it is e^-hundreds and the bound
overflows float64 (our Fisher blocks of N = 770: log10 bound in the hundreds against an exact kappa of ~10^3; see
docs/benchmarks/qnewton.md). `kappa_estimate` therefore clamps it by a second valid upper bound (Gershgorin's
discs, finite when the regularised matrix is diagonally dominant) and labels the figure "bound"; a bound never
proves a matrix singular (the LU pivot check does that).

Cheap and exact for the dense empirical Fisher F = G^T G / B (+ w I for weight decay) of B < N examples: F's
non-zero eigenvalues are those of the B x B Gram matrix G G^T / B and the other N - B are 0, so lambda_max(F + s I) =
lambda_max(Gram) + w + s and lambda_min = w + s exactly, at O(B^2 N) instead of the O(N^3) of an eigendecomposition
(which would cost as much as the classical solve it is compared with). Methods: "gram", "exact" (eigenvalues,
blocks up to newton_kappa_exact), "bound".
"""

from __future__ import annotations

import math

import torch


def kappa_exact(a: torch.Tensor) -> float:
    """sigma_max / sigma_min from the singular values (inf for a singular matrix)."""
    s = torch.linalg.svdvals(a.double())
    lo = float(s[-1])
    return math.inf if lo == 0 else float(s[0]) / lo


def log_kappa_bound(a: torch.Tensor) -> float:
    """The natural log of the Merikoski et al. upper bound on kappa(a) (inf when a is singular)."""
    a = a.double()
    n = a.shape[0]
    fro2 = float((a * a).sum())
    if fro2 == 0:
        return math.inf
    if torch.allclose(a, a.T):
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:  # positive definite: log|det| from the Cholesky factor (half an LU's work)
            logabsdet = 2 * float(torch.log(chol.diagonal()).sum())
        else:
            logabsdet = float(torch.linalg.slogdet(a).logabsdet)
    else:
        logabsdet = float(torch.linalg.slogdet(a).logabsdet)
    if not math.isfinite(logabsdet):
        return math.inf
    log_y = min(0.0, n * (math.log(n) - math.log(fro2)) + 2 * logabsdet)
    x = math.sqrt(max(0.0, -math.expm1(log_y)))
    return math.log1p(x) - log_y / 2


def kappa_bound(a: torch.Tensor) -> float:
    """The Merikoski et al. upper bound on kappa(a) (>= the true kappa; inf when singular or beyond float range)."""
    lk = log_kappa_bound(a)
    return math.exp(lk) if lk < 709 else math.inf


def kappa_pair(h: torch.Tensor, shift: float, exact: bool) -> tuple[float, float]:
    """(kappa(H), kappa(H + shift I)) of a symmetric H. Exact: one eigendecomposition serves both (the singular
    values of a symmetric matrix are its eigenvalues' magnitudes; a shift moves every eigenvalue by it); else the
    bound of each (two factorisations)."""
    h = h.double()
    if exact:
        e = torch.linalg.eigvalsh(h)

        def k(v):
            m = v.abs()
            lo = float(m.min())
            return math.inf if lo == 0 else float(m.max()) / lo

        return k(e), k(e + shift)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return kappa_bound(h), kappa_bound(h + shift * eye)


def gershgorin_kappa(a: torch.Tensor) -> float:
    """An upper bound on kappa of a symmetric matrix from Gershgorin's discs: max_i (|a_ii| + r_i) / min_i (|a_ii| -
    r_i), r_i the off-diagonal absolute row sum (inf unless the matrix is strictly diagonally dominant)."""
    a = a.double()
    diag = a.diagonal().abs()
    r = a.abs().sum(1) - diag
    lo = float((diag - r).min())
    return float((diag + r).max()) / lo if lo > 0 else math.inf


def gram_kappa(factor: torch.Tensor, diag_shift: float, shift: float) -> tuple[float, float]:
    """(kappa(F + w I), kappa(F + w I + s I)) for F = factor^T factor (factor [B, N]) with w = diag_shift, s = shift,
    exactly, from the eigenvalues of the B x B Gram matrix factor factor^T (F has min(B, N) of them, the rest 0)."""
    f = factor.double()
    b, n = f.shape
    e = torch.linalg.eigvalsh(f @ f.T).clamp(min=0).flip(0)  # descending
    top = float(e[0]) if b else 0.0
    low = float(e[n - 1]) if b >= n else 0.0

    def k(sh: float) -> float:
        lo = low + sh
        return math.inf if lo <= 0 else (top + sh) / lo

    return k(diag_shift), k(diag_shift + shift)


def kappa_estimate(h: torch.Tensor, shift: float, exact_limit: int, factor: torch.Tensor | None = None,
                   diag_shift: float = 0.0) -> tuple[float, float, str]:
    """(kappa before, kappa after the shift, method) of a symmetric Newton matrix h: "gram" when h = factor^T
    factor + diag_shift I with fewer rows in factor than h has (exact, cheap), "exact" up to exact_limit rows,
    else "bound" (the Merikoski bound clamped by Gershgorin's; an upper bound, possibly very loose)."""
    n = h.shape[0]
    if factor is not None and factor.shape[0] < n:
        kb, ka = gram_kappa(factor, diag_shift, shift)
        return kb, ka, "gram"
    if n <= exact_limit:
        kb, ka = kappa_pair(h, shift, exact=True)
        return kb, ka, "exact"
    eye = torch.eye(n, dtype=torch.float64)
    after = h.double() + shift * eye
    return (min(kappa_bound(h), gershgorin_kappa(h)), min(kappa_bound(after), gershgorin_kappa(after)), "bound")
