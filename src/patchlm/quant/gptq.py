"""GPTQ (Frantar et al. 2023) and round-to-nearest for one weight matrix, as pure functions on tensors.

A weight W [out, in] acts as y = W x. Quantization is asymmetric min-max per (row, group of input columns):
code = clamp(round(w / scale) + zero, 0, 2^b - 1), w ~ scale * (code - zero), the range always holding 0 so the
zero point is an integer code. GPTQ quantizes the columns one at a time and spreads each column's error over the
columns not yet quantized through the inverse Hessian H^-1 of the layer-wise loss ||W X - Q X||^2, H = 2 X X^T / n
(its Cholesky factor, in blocks of `block_size` columns with lazy batch updates). Traps handled here: a dead input
(H_jj = 0: the column never sees a non-zero input) gets H_jj = 1 and its weights are quantized as they are
(they cannot matter); a Hessian that is all zero (an expert that received no tokens) is refused, the caller falls
back to RTN; a failed Cholesky factorization retries with 10x the dampening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from patchlm.errors import ConfigError, PatchlmError


class HessianError(PatchlmError):
    """No usable Hessian: no calibration input reached the module, or it stays singular after every retry."""


@dataclass
class Quantized:
    """One quantized matrix: integer codes [out, in] (uint8), scales and zero codes [out, groups], and g_idx [in]
    (the group of each input column; None when groups are contiguous, i.e. without act-order)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None
    report: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, self.g_idx)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """W ~ scale[g] * (code - zero[g]) for each column's group g, in float32."""
    if g_idx is None:  # contiguous groups: broadcast per group instead of gathering per column
        rows, cols = codes.shape
        gs = group_size or cols
        c = codes.view(rows, cols // gs, gs).float()
        return ((c - zeros.float()[:, :, None]) * scales.float()[:, :, None]).view(rows, cols)
    g = g_idx.long()
    return scales.float()[:, g] * (codes.float() - zeros.float()[:, g])


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero code) per row of w [rows, cols]: asymmetric min-max, the range widened to hold 0."""
    maxq = (1 << bits) - 1
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    flat = (hi - lo) == 0
    lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
    hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """Scales as stored (float16, clamped away from 0 and overflow); quantizing with the stored value keeps codes
    and dequantization consistent."""
    return scale.clamp(min=6.2e-5, max=65000.0).half().float()


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of a column (or matrix with per-row scale/zero broadcast)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def check_group(cols: int, group_size: int, where: str = "") -> None:
    """Refuse a group size that does not divide the number of input columns."""
    if group_size and cols % group_size:
        divs = [d for d in (32, 64, 96, 128, 192, 256) if cols % d == 0]
        hint = f"e.g. {divs[-1]}" if divs else "0 (one group per row)"
        raise ConfigError(f"group_size {group_size} does not divide the input size {cols}{where}; choose a "
                          f"divisor of every quantized input size, {hint}", field="group_size")


def rtn(w: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Round-to-nearest: each group's min-max scale, every weight rounded independently."""
    w = w.detach().float()
    rows, cols = w.shape
    check_group(cols, group_size)
    gs = group_size or cols
    ng = cols // gs
    wg = w.view(rows, ng, gs).permute(1, 0, 2).reshape(ng * rows, gs)
    scale, zero = minmax_params(wg, bits)
    scale = _fp16(scale)
    codes = quantize_column(wg, scale[:, None], zero[:, None], bits)
    codes = codes.view(ng, rows, gs).permute(1, 0, 2).reshape(rows, cols)
    return Quantized(codes=codes.to(torch.uint8), scales=scale.view(ng, rows).T.contiguous().half(),
                     zeros=zero.view(ng, rows).T.contiguous().to(torch.uint8), bits=bits, group_size=group_size,
                     report={"method": "rtn"})


def _inverse_cholesky(H: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1 with lambda = damp x mean diag(H); on failure damp x 10 again,
    `retries` times. Returns (factor, the damp fraction that worked)."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    frac = damp
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return U, frac
        frac *= 10
    raise HessianError(f"the Hessian stays singular after {retries} dampening increases (last damp {frac / 10:g}); "
                       "give more calibration data or a larger damp")


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
         damp: float = 0.01, damp_retries: int = 6, block_size: int = 128) -> Quantized:
    """GPTQ of w [out, in] against the Hessian H [in, in] of its inputs (float64 math for H's factorization)."""
    W = w.detach().float().clone()
    rows, cols = W.shape
    check_group(cols, group_size)
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {list(H.shape)} for a weight with {cols} input columns")
    H = H.detach().double().clone()
    if not bool(torch.isfinite(H).all()) or float(torch.diag(H).max()) <= 0:
        raise HessianError("the Hessian is zero: no calibration input reached this module")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U, used = _inverse_cholesky(H, damp, damp_retries)
    Hinv = U.float()
    gs = group_size or cols
    ng = cols // gs
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, ng)
    zeros = torch.zeros(rows, ng)
    scale = zero = None
    err_sum = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hb = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:  # a new group: its range from the columns as they are now (errors spread so far)
                ahead = W1[:, i:i + gs] if i + gs <= i2 - i1 else torch.cat([W1[:, i:], W[:, i2:j + gs]], dim=1)
                s, z = minmax_params(ahead, bits)
                scale, zero = _fp16(s), z
                scales[:, j // gs], zeros[:, j // gs] = scale, zero
            col = W1[:, i]
            q = quantize_column(col, scale, zero, bits)
            codes[:, j] = q.to(torch.uint8)
            deq = scale * (q - zero)
            d = Hb[i, i]
            e = (col - deq) / d
            err_sum += float(((col - deq) ** 2 / d ** 2).sum())
            W1[:, i:] -= e[:, None] * Hb[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    g_idx = None
    if act_order:
        inv = torch.argsort(perm)
        codes = codes[:, inv].contiguous()
        g_idx = (torch.arange(cols) // gs)[inv].to(torch.int32)
    report = {"method": "gptq", "damp": used, "dead_columns": int(dead.sum()), "loss": err_sum / 2}
    return Quantized(codes=codes, scales=scales.half(), zeros=zeros.to(torch.uint8), bits=bits,
                     group_size=group_size, g_idx=g_idx, report=report)


class Hessian:
    """Running H = 2/n sum x x^T over the rows of the inputs a module sees (float64), and the row count n."""

    def __init__(self, cols: int):
        self.H = torch.zeros(cols, cols, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.H.mul_(self.n / total).add_(x.T @ x, alpha=2.0 / total)
        self.n = total


def layer_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / 2 = the mean squared output error over the calibration inputs (what GPTQ lowers)."""
    d = (w.float() - q.float()).double()
    return float(torch.einsum("ij,jk,ik->", d, H.double(), d)) / 2


def bits_per_weight(bits: int, group_size: int, cols: int) -> float:
    """Stored bits per weight including a float16 scale and an 8-bit zero per group."""
    gs = group_size or cols
    return bits + 24 / gs if gs else math.inf
