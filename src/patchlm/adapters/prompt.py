"""Prompt tuning (Lester et al., 2021): n trainable virtual token embeddings in front of the input embeddings.

The patch holds one tensor, `prompt_embeddings` [n, hidden] (PEFT's `PromptEmbedding.embedding.weight`).
Attached, every sequence the backbone starts gets the n embeddings prepended (positions 0..n-1, the input at
n..n+T-1, the mask extended by n ones) and the n virtual positions are stripped from the backbone's outputs, so
the logits, the engine's loss and label scoring see the caller's length: the logits are PEFT's logits without
their first n positions. See `patchlm.adapters.virtual`.

Init from the seed: "vocab" (default) copies the embeddings of n tokens sampled from the vocabulary (PEFT's
SAMPLE_VOCAB; ZO-Bench initialises prompts from real tokens too); "random" is PEFT's RANDOM, N(0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchlm.adapters.config import check_positive_int, from_spec, to_spec
from patchlm.adapters.virtual import (
    VirtualTable,
    VirtualTokensKind,
    check_free,
    freeze_base,
    install,
    sample_token_ids,
    text_config,
)
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.patch import register_kind
from patchlm.typed import check_fields

TENSOR = "prompt_embeddings"
ATTR = "patchlm_prompt"
PROMPT_INITS = ("vocab", "random")


@dataclass
class PromptConfig:
    """Prompt-tuning hyper-parameters: a prompt patch's spec, the `--method prompt` options, a recipe's spec."""

    num_virtual_tokens: int = field(default=10, metadata={
        "help": "prompt tuning: virtual token embeddings in front of the input"})
    init: str = field(default="vocab", metadata={
        "help": "prompt init: vocab (embeddings of sampled vocabulary tokens, PEFT's SAMPLE_VOCAB) | random "
                "(N(0, 1), PEFT's RANDOM)"})
    token_dim: int | None = field(default=None, metadata={
        "cli": False, "help": "the model's hidden size: filled in when the patch is made"})

    def __post_init__(self):
        check_fields(self)
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens", "prompt tuning")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"unknown prompt init {self.init!r}; choices: {', '.join(PROMPT_INITS)}", field="init")


@register_kind("prompt", stage="weight", capabilities=("export-peft",))
class PromptKind(VirtualTokensKind):
    """spec: PromptConfig's fields (token_dim filled in) and the init seed."""

    ATTR, TENSOR = ATTR, TENSOR

    def attach(self, model, spec, tensors=None, seed=0):
        cfg = from_spec(PromptConfig, dict(spec), "prompt", strict=tensors is None)
        check_free(model, ATTR, "prompt")
        emb = model.get_input_embeddings()
        hidden = int(emb.weight.shape[1])
        if hidden != int(getattr(text_config(model), "hidden_size", hidden)):
            raise PatchFormatError("the model's input embeddings are not its hidden size: cannot prompt-tune it")
        n = int(cfg.num_virtual_tokens)
        if cfg.token_dim is not None and int(cfg.token_dim) != hidden:
            raise PatchFormatError(f"prompt patch has token_dim={cfg.token_dim} but the model's hidden size is "
                                   f"{hidden}: patch made for another architecture")
        if tensors is not None:
            t = tensors.get(TENSOR)
            if t is None:
                raise PatchFormatError(f"prompt patch has no tensor {TENSOR!r}")
            if tuple(t.shape) != (n, hidden):
                raise PatchFormatError(f"prompt tensor has shape {tuple(t.shape)}, but {n} virtual tokens on this "
                                       f"model need ({n}, {hidden}): patch made for another architecture")
            init = t.float()
        elif cfg.init == "vocab":
            with torch.no_grad():
                init = emb(sample_token_ids(model, n, seed).to(emb.weight.device)).float().cpu()
        else:
            init = torch.randn((n, hidden), generator=torch.Generator().manual_seed(int(seed)))
        table = VirtualTable(n, hidden, device=emb.weight.device)
        with torch.no_grad():
            table.weight.copy_(init)

        def begin(bb, cache, batch):
            return table().unsqueeze(0).expand(batch, -1, -1)

        install(model, ATTR, table, n, "prompt", begin)
        freeze_base(model, table)
        return {**spec, **to_spec(cfg, token_dim=hidden),
                "seed": int(seed) if tensors is None else spec.get("seed", seed)}

    def summary(self, spec, tensors):
        return {"num_virtual_tokens": spec.get("num_virtual_tokens"), "token_dim": spec.get("token_dim")}
