"""LLM-Drop importance scores from forward hooks on one forward pass per calibration batch.

For layer i with residual input X (the decoder layer's input):
  attention similarity = mean over tokens of cos(X, X + Attn(Norm(X)))   (= cos(layer input, MLP-norm input))
  MLP similarity       = mean over tokens of cos(Y, Y + MLP(Norm(Y)))     (Y = the MLP sub-layer's input)
  block similarity     = mean over tokens of cos(layer input, layer output)
High similarity = the module changes its input little = a candidate to drop (importance = 1 - similarity).
A sub-layer that is already dropped scores exactly 1 (it is the identity). Nothing of the model is
re-implemented: the hooks read the residual stream where transformers' own forward passes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchlm.data import load_task
from patchlm.data.features import example_text, pack_blocks
from patchlm.depth.arch import decoder_layers, family
from patchlm.depth.config import DropConfig
from patchlm.errors import DataError
from patchlm.models.parts import model_device
from patchlm.train.engine import autocast


def calibration_blocks(tokenizer, task: str = DropConfig.calib, samples: int = DropConfig.samples,
                       seq_len: int = DropConfig.seq_len, split: str = "train", seed: int = 0) -> torch.Tensor:
    """`samples` blocks of `seq_len` tokens of the task's text (packed with EOS), as a LongTensor [N, T]."""
    if samples <= 0 or seq_len < 2:
        raise DataError(f"calibration needs samples >= 1 and seq_len >= 2, got {samples} x {seq_len}")
    t = load_task(task, seed=seed)
    texts = [example_text(t, e, tokenizer) for e in t.split(split)]
    blocks = pack_blocks(tokenizer, texts, seq_len, max_tokens=samples * seq_len)
    blocks = [b for b in blocks if len(b) == seq_len][:samples]
    if not blocks:
        raise DataError(f"task {task} has too little {split} text for one block of {seq_len} tokens")
    return torch.tensor(blocks, dtype=torch.long)


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    c = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    return float(c.sum()), c.numel()


@torch.no_grad()
def similarity_scores(model, blocks: torch.Tensor, batch_size: int = DropConfig.batch_size,
                      bf16: bool = DropConfig.bf16) -> dict[str, list[float]]:
    """{"attention": [...], "mlp": [...], "block": [...]}: one mean cosine similarity per layer."""
    fam = family(model, "scoring")
    layers = decoder_layers(model)
    n = len(layers)
    sums = {k: [0.0] * n for k in ("attention", "mlp", "block")}
    counts = [0] * n
    cur: dict[int, dict] = {}
    handles = []

    def on_layer_in(i):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            cur[i] = {"in": x.detach()}
        return hook

    def on_mid(i):
        def hook(_m, args):
            cur[i]["mid"] = args[0].detach()
        return hook

    def on_layer_out(i):
        def hook(_m, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            x = cur[i]["in"]
            mid = cur[i].get("mid")
            st = getattr(layers[i], "_depth", None)
            if mid is None:  # the MLP-side norm did not run: one of the sub-layers is dropped
                mid = x if (st is not None and st.attn_dropped) else y
            for key, (a, b) in {"attention": (x, mid), "mlp": (mid, y), "block": (x, y)}.items():
                s, _ = _cos_sum(a, b)
                sums[key][i] += s
            counts[i] += x.shape[0] * x.shape[1]
            cur.pop(i, None)
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(on_layer_out(i), with_kwargs=True))
        mid_mod = layer._modules.get(fam.mlp_norm)
        if mid_mod is not None:
            handles.append(mid_mod.register_forward_pre_hook(on_mid(i)))
    device = model_device(model)
    was = model.training
    model.eval()
    try:
        for s in range(0, len(blocks), batch_size):
            ids = blocks[s: s + batch_size].to(device)
            with autocast(device, bf16):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: [v[i] / max(1, counts[i]) for i in range(n)] for k, v in sums.items()}


@torch.no_grad()
def span_similarity(model, blocks: torch.Tensor, span: int, batch_size: int = DropConfig.batch_size,
                    bf16: bool = DropConfig.bf16) -> list[float]:
    """cos(input of layer l, output of layer l+span-1) for every start l: the consecutive-block criterion."""
    family(model, "scoring")
    layers = decoder_layers(model)
    n = len(layers)
    if not 1 <= span <= n:
        raise DataError(f"span {span} must be between 1 and the number of layers {n}")
    starts = n - span + 1
    sums, count = [0.0] * starts, [0]
    ins: dict[int, torch.Tensor] = {}
    handles = []

    def on_in(i):
        def hook(_m, args, kwargs):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def on_out(i):
        def hook(_m, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            start = i - span + 1
            if start >= 0:
                s, _ = _cos_sum(ins.pop(start), y)
                sums[start] += s
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_in(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(on_out(i), with_kwargs=True))
    device = model_device(model)
    was = model.training
    model.eval()
    try:
        for s in range(0, len(blocks), batch_size):
            ids = blocks[s: s + batch_size].to(device)
            with autocast(device, bf16):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            count[0] += ids.numel()
            ins.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [v / max(1, count[0]) for v in sums]
