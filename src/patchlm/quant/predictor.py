"""The learned block-importance scorer: per decoder block, a small MLP trained (through the engine's one loop) to
predict each token's cos(block input, block output) from the block input; a block whose predicted cosine is low
changes the hidden state most and gets more bits. Scores = 1 - the mean predicted cosine on held-out tokens."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from patchlm.models.parts import model_device
from patchlm.quant.config import QuantConfig
from patchlm.quant.units import decoder_layers
from patchlm.train.engine import train_loop
from patchlm.train.optim import make_optimizer

HIDDEN, BATCH, LR = 32, 256, 3e-3  # the predictor's own size and training (small by design)


class CosPredictor(nn.Module):
    """h -> predicted cos(h, block(h)) in [-1, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(h)).squeeze(-1)


def _mse(model, batch):
    pred = model(batch["x"])
    return F.mse_loss(pred, batch["y"]), batch["y"].numel()


@torch.no_grad()
def block_pairs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (its input hidden states [N, H], the per-token cos(in, out) [N]) over the calibration windows."""
    _, layers = decoder_layers(model)
    ins: dict[int, list] = {i: [] for i in range(len(layers))}
    cos: dict[int, list] = {i: [] for i in range(len(layers))}
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            o = out[0] if isinstance(out, tuple) else out
            ins[i].append(h.reshape(-1, h.shape[-1]).float().cpu())
            cos[i].append(F.cosine_similarity(h.float(), o.float(), dim=-1, eps=1e-12).reshape(-1).cpu())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s:s + batch_size].to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(ins[i]), torch.cat(cos[i])) for i in range(len(layers))]


def block_importance(model: nn.Module, windows: torch.Tensor, cfg: QuantConfig,
                     log: Callable[[str], None] = lambda s: None) -> dict[int, float]:
    """layer -> 1 - mean predicted cos(in, out) on the held-out quarter of the calibration tokens."""
    pairs = block_pairs(model, windows, cfg.batch_size)
    opt_cfg = SimpleNamespace(lr=LR, weight_decay=0.0, max_grad_norm=None, momentum=0.0, beta1=0.9, beta2=0.999)
    scores = {}
    for i, (x, y) in enumerate(pairs):
        g = torch.Generator().manual_seed(cfg.seed + i)
        perm = torch.randperm(x.shape[0], generator=g)
        cut = max(1, int(0.75 * x.shape[0]))
        tr, te = perm[:cut], perm[cut:] if cut < x.shape[0] else perm[:cut]
        torch.manual_seed(cfg.seed + i)
        net = CosPredictor(x.shape[1])

        def batches(step, tr=tr, x=x, y=y):
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
            idx = tr[torch.randint(len(tr), (min(BATCH, len(tr)),), generator=gen)]
            return [{"x": x[idx], "y": y[idx]}]

        rule = make_optimizer("adamw", list(net.parameters()), opt_cfg)
        train_loop(net, rule, batches, cfg.predictor_steps, loss_fn=_mse, count=example_count_xy)
        net.eval()
        with torch.no_grad():
            scores[i] = 1.0 - float(net(x[te]).mean())
        log(f"predictor block {i}: importance {scores[i]:.4f} (measured {1 - float(y[te].mean()):.4f})")
    return scores


def example_count_xy(batch) -> int:
    """Tokens in a predictor batch (the engine weighs micro-batches by it)."""
    return int(batch["y"].numel())
