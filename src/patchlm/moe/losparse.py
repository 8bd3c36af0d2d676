"""Low-rank plus sparse experts (LoSparse, the "compress" of MC-SMoE) on Mixtral's fused expert tensors.

Each expert matrix W (gate, up and down of every expert separately) becomes U V + S * mask: U V the rank-r SVD part,
S the residual W - U V, of which a `sparsity` fraction is pruned by importance |S x dL/dS| (an EMA over steps) on a
cubic schedule. `factorize` puts the factored form on a model as a torch parametrization, so Mixtral's own forward
reads the product and training moves U, V and S; `bake` writes the dense product back so the model saves and loads
as a plain Mixtral.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import parametrize

from patchlm.errors import ConfigError

TENSORS = (("gate_up_proj", 2), ("down_proj", 1))  # fused expert tensor, matrices stacked along its rows


def factored_params(out_features: int, in_features: int, rank: int, sparsity: float) -> int:
    """Parameters of one factored matrix: rank (out + in) plus the kept entries of its sparse part."""
    return rank * (out_features + in_features) + math.ceil((1 - sparsity) * out_features * in_features)


def check_growth(out_features: int, in_features: int, rank: int, sparsity: float) -> None:
    """Refuse a rank / sparsity that would give a matrix at least as many parameters as its dense form."""
    dense = out_features * in_features
    if rank >= min(out_features, in_features):
        raise ConfigError(f"low_rank {rank} is not below the expert matrices' smaller side "
                          f"({out_features}x{in_features}): it compresses nothing", field="low_rank")
    got = factored_params(out_features, in_features, rank, sparsity)
    if got >= dense:
        raise ConfigError(f"low_rank {rank} with sparsity {sparsity} gives {got} parameters per {out_features}x"
                          f"{in_features} expert matrix, not fewer than its {dense}: raise sparsity or lower "
                          "low_rank", field="sparsity")


def cubic_sparsity(step: int, total: int, target: float, end: float) -> float:
    """LoSparse's cubic schedule: target x (1 - (1 - t / T)^3), T = end x total, then flat at the target."""
    T = max(1, math.ceil(end * total))
    return target * (1 - (1 - min(1.0, step / T)) ** 3)


class LowRankSparse(torch.nn.Module):
    """A parametrization of a fused [M, c*o, i] expert tensor as c stacked factored [o, i] matrices per expert."""

    def __init__(self, weight: torch.Tensor, chunks: int, rank: int, beta: float):
        super().__init__()
        M, rows, i = weight.shape
        W = weight.detach().float().reshape(M, chunks, rows // chunks, i).transpose(0, 1)  # [c, M, o, i]
        self.shape, self.dtype, self.rank, self.beta = tuple(weight.shape), weight.dtype, rank, beta
        if rank > 0:
            u, s, vh = torch.linalg.svd(W, full_matrices=False)
            root = s[..., :rank].sqrt()
            self.U = torch.nn.Parameter((u[..., :rank] * root.unsqueeze(-2)).contiguous())
            self.V = torch.nn.Parameter((vh[..., :rank, :] * root.unsqueeze(-1)).contiguous())
            W = W - self.U.detach() @ self.V.detach()
        self.S = torch.nn.Parameter(W.contiguous())
        self.register_buffer("mask", torch.ones_like(W, dtype=torch.bool))
        self.register_buffer("importance", torch.zeros_like(W))
        self.S.register_hook(self._observe)

    def _observe(self, grad: torch.Tensor) -> torch.Tensor:
        """EMA of |S x grad| (the sensitivity LoSparse prunes by), updated on every backward pass."""
        self.importance.mul_(self.beta).add_((self.S.detach() * grad.detach()).abs(), alpha=1 - self.beta)
        return grad

    def dense(self) -> torch.Tensor:
        W = self.S * self.mask
        if self.rank > 0:
            W = W + self.U @ self.V
        return W.transpose(0, 1).reshape(self.shape).to(self.dtype)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.dense()

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Keep the (1 - sparsity) most important entries of each matrix's sparse part (ties by magnitude)."""
        c, M, o, i = self.S.shape
        n = o * i
        drop = min(n, round(sparsity * n))
        score = self.importance + self.S.abs() * 1e-12  # no gradient seen yet: magnitude decides
        flat = score.reshape(c, M, n)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if drop:
            idx = flat.topk(drop, dim=-1, largest=False).indices
            mask.scatter_(-1, idx, False)
        self.mask.copy_(mask.reshape(c, M, o, i))
        self.S.mul_(self.mask)

    def params(self) -> int:
        """Parameters of the factored form: U, V and the kept entries of S."""
        low = self.U.numel() + self.V.numel() if self.rank > 0 else 0
        return low + int(self.mask.sum())


def factorize(model: torch.nn.Module, rank: int, beta: float) -> list[LowRankSparse]:
    """Put every layer's fused expert tensors in the factored form (a parametrization; the model still runs)."""
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name, chunks in TENSORS:
            p = LowRankSparse(getattr(experts, name), chunks, rank, beta)
            parametrize.register_parametrization(experts, name, p, unsafe=True)
            getattr(experts.parametrizations, name).original.requires_grad_(False)
            out.append(p)
    return out


def factored_parameters(parts: list[LowRankSparse]) -> list[torch.nn.Parameter]:
    return [q for p in parts for q in ([p.U, p.V, p.S] if p.rank > 0 else [p.S])]


def bake(model: torch.nn.Module) -> None:
    """Replace the parametrizations by their dense product: a plain Mixtral again (saves with the fused keys)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name, _ in TENSORS:
            if parametrize.is_parametrized(experts, name):
                with torch.no_grad():
                    dense = getattr(experts, name).detach().clone()
                parametrize.remove_parametrizations(experts, name, leave_parametrized=False)
                getattr(experts, name).data = dense
