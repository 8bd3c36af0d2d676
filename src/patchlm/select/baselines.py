"""The baseline selectors SHED is compared with, under the same interface: each returns (pool positions, value).

- random: a seeded uniform sample.
- full: the whole pool.
- perplexity: the base model's perplexity of each example; keep the lowest (or middle, or highest).
- kcenter: greedy k-center coverage of the embeddings (farthest point first, seeded start).
- knn-shapley: the closed-form KNN-Shapley values of Jia et al. (2019) on the embeddings, computed by dattri's
  KNNShapleyAttributor (a maintained data-attribution library), averaged over validation examples; keep the top.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patchlm.data.features import collate, example_text, pad_id
from patchlm.models.parts import autocast, model_device
from patchlm.train.engine import per_example_loss, to_device


def random_select(n: int, budget: int, seed: int) -> list[int]:
    """`budget` distinct positions of 0..n-1, uniformly at random (seeded), in ascending order."""
    return sorted(int(i) for i in np.random.default_rng([seed, 11]).choice(n, size=budget, replace=False))


def kcenter_greedy(emb: np.ndarray, budget: int, seed: int) -> tuple[list[int], list[float]]:
    """Greedy k-center: start at a seeded random point, then repeatedly add the point farthest from the chosen
    ones. Returns the positions in the order chosen and each one's distance to the earlier centres (inf first)."""
    x = torch.as_tensor(emb, dtype=torch.float32)
    n = len(x)
    first = int(np.random.default_rng([seed, 13]).integers(n))
    sq = (x * x).sum(1)
    chosen, gaps = [first], [math.inf]
    dist = (sq + sq[first] - 2 * x @ x[first]).clamp(min=0)
    dist[first] = -1.0
    while len(chosen) < budget:
        j = int(dist.argmax())
        gaps.append(float(dist[j].sqrt()))
        chosen.append(j)
        dist = torch.minimum(dist, (sq + sq[j] - 2 * x @ x[j]).clamp(min=0))
        dist[chosen] = -1.0
    return chosen, gaps


@torch.no_grad()
def example_perplexities(model, tokenizer, task, examples: list[dict], batch_size: int, max_length: int,
                         bf16: bool = False, progress: bool = False) -> np.ndarray:
    """exp(mean next-token loss) of each example's whole text (chat examples through the chat template)."""
    device = model_device(model)
    pad = pad_id(tokenizer)
    feats = []
    for e in examples:
        ids = tokenizer(example_text(task, e, tokenizer), add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) < 2:
            ids = ids + [pad] * (2 - len(ids))
        feats.append({"input_ids": ids, "labels": list(ids)})
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    out = np.empty(len(feats))
    was = model.training
    model.eval()
    bar = None
    if progress and len(feats) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(feats), desc="perplexity", unit="ex", leave=False)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = collate([feats[i] for i in idx], pad)
            with autocast(device, bf16):
                loss = per_example_loss(model, to_device(batch, device))
            out[idx] = np.exp(np.minimum(loss.float().cpu().numpy(), 50.0))
            if bar:
                bar.update(len(idx))
    finally:
        model.train(was)
        if bar:
            bar.close()
    return out


def perplexity_select(ppl: np.ndarray, budget: int, keep: str) -> list[int]:
    """Positions of the `budget` lowest / middle / highest perplexities (ties by position)."""
    order = np.argsort(ppl, kind="stable")
    if keep == "high":
        order = order[::-1]
    elif keep == "middle":
        start = (len(order) - budget) // 2
        return [int(i) for i in order[start: start + budget]]
    return [int(i) for i in order[:budget]]


def knn_shapley_values(train_emb: np.ndarray, train_labels: np.ndarray, val_emb: np.ndarray,
                       val_labels: np.ndarray, k: int, batch_size: int = 4096) -> np.ndarray:
    """Each training example's KNN-Shapley value (dattri's KNNShapleyAttributor), the mean over validation."""
    import contextlib
    import io

    from dattri.algorithm.data_shapley import KNNShapleyAttributor
    from torch.utils.data import DataLoader, TensorDataset

    tr = torch.as_tensor(train_emb, dtype=torch.float32)
    va = torch.as_tensor(val_emb, dtype=torch.float32)
    ytr, yva = [int(y) for y in train_labels], [int(y) for y in val_labels]
    loader = lambda x, y: DataLoader(TensorDataset(x, torch.tensor(y)), batch_size=batch_size)  # noqa: E731
    with contextlib.redirect_stderr(io.StringIO()):  # its two progress bars
        sv = KNNShapleyAttributor(k_neighbors=k).attribute(loader(tr, ytr), loader(va, yva), ytr, yva)
    return sv.mean(0).double().numpy()
