"""Router initialisation, as mergekit-moe defines its gate modes (one [E, h] router per layer; rows per expert).

- hidden (= hidden_last): per layer, the hidden state *entering* the layer at the last position of each prompt,
  averaged over the expert's positive prompts, minus the same over its negative prompts, L2-normalised.
- hidden_avg: the same with the mean over positions (padding included, as mergekit-moe does) instead of the last.
- cheap_embed: the sum of the prompts' raw token embeddings, L2-normalised (negatives: the same, subtracted),
  then normalised again; the same vector in every layer.
- random: unscaled standard normal entries.  uniform_random: U(-1/sqrt(h), 1/sqrt(h)) (torch.nn.Linear's init).

Prompts are tokenized as mergekit-moe does: BOS text prepended, no other special tokens, one left-padded batch per
expert (padded with BOS), so the vectors match its own for the same model (it runs `hidden` in bf16; this runs in
the model's dtype). Random modes draw from the given generator: seeded like mergekit's --random-seed, the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from patchlm.errors import ConfigError

EPS = 1e-8


def tokenize_prompts(tokenizer, prompts: Sequence[str], what: str) -> dict[str, torch.Tensor]:
    """One left-padded batch (pad = BOS, else EOS) of BOS + prompt; refuses a prompt that tokenizes to nothing."""
    for p in prompts:
        if not tokenizer(p, add_special_tokens=False)["input_ids"]:
            raise ConfigError(f"{what}: the prompt {p!r} tokenizes to nothing")
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    try:
        tokenizer.padding_side = "left"
        if tokenizer.bos_token is not None:
            tokenizer.pad_token = tokenizer.bos_token
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return dict(tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                              padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


@torch.no_grad()
def layer_inputs(model, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """[L, h]: the hidden state entering each decoder layer, at the last position (or the mean over positions),
    averaged over the batch's prompts."""
    from patchlm.models.parts import model_device

    dev = model_device(model)
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                output_hidden_states=True, return_dict=True)
    hs = torch.stack(out.hidden_states[:-1]).float()  # [L, B, T, h]
    hs = hs.mean(2) if average else hs[:, :, -1, :]
    return hs.mean(1).cpu()


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """[L, h]: the normalised sum of the prompts' token embeddings (padding masked), repeated per layer."""
    h = embed.float()[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1).float()
    v = h.sum(1).sum(0, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=EPS)
    return v.repeat(num_layers, 1)


def gate_vectors(mode: str, model, tokenizer, experts: Sequence, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """[L, E, h] router weights of every layer for `experts` (objects with positive_prompts / negative_prompts)."""
    cfg = model.config
    L, E, h = int(cfg.num_hidden_layers), len(experts), int(cfg.hidden_size)
    if mode == "random":
        return torch.randn((L, E, h), generator=generator)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / h)
        return torch.rand((L, E, h), generator=generator) * 2 * scale - scale
    if mode == "cheap_embed":
        embed = model.get_input_embeddings().weight.detach()

        def vec(batch):
            return cheap_embedding(embed, batch, L)
    elif mode in ("hidden", "hidden_last", "hidden_avg"):
        def vec(batch):
            return layer_inputs(model, batch, average=mode == "hidden_avg")
    else:
        raise ConfigError(f"unknown gate mode {mode!r}", field="gate_mode")
    rows = []
    for i, e in enumerate(experts):
        what = f"expert {i} ({getattr(e, 'source', '?')})"
        if not e.positive_prompts:
            raise ConfigError(f"{what} has no positive prompts (gate mode {mode} needs them)", field="gate_mode")
        v = vec(tokenize_prompts(tokenizer, e.positive_prompts, what))
        if e.negative_prompts:
            v = v - vec(tokenize_prompts(tokenizer, e.negative_prompts, what))
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS))
    return torch.stack(rows, 0).permute(1, 0, 2).contiguous()
