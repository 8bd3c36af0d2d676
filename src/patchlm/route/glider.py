"""GLIDER's global router: the base model writes a short task instruction for each expert (from its description
and example inputs) and for each incoming query (from the query alone: written per query, as the paper intends,
not looked up by task name as the official code does); a sentence encoder (minilm-l6) embeds both, and
scale x cosine(query, expert) becomes a per-sequence bias added to every routed module's local gate logits.

`global_from="input"` is a cheaper variant: the raw query and the mean of the expert's example embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchlm.data.features import pad_id
from patchlm.models import load_base
from patchlm.models.parts import model_device
from patchlm.route.config import RouteConfig
from patchlm.route.library import Library

EXPERT_PROMPT = ("Here is a task description and a few inputs of the task.\nDescription: {description}\n{examples}\n"
                 "Write one short sentence that tells someone what to do with such an input.")
QUERY_PROMPT = ("Here is one input of some task.\nInput: {text}\n"
                "Write one short sentence that tells someone what to do with such an input.")


def _clip(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."


def _chat(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\nInstruction:"


@torch.no_grad()
def write_instructions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       batch_size: int = 16) -> list[str]:
    """Greedy instructions from the base model, one per prompt (left-padded batches)."""
    device = model_device(model)
    out: list[str] = [""] * len(prompts)
    texts = [_chat(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
            for j, i in enumerate(idx):
                text = tokenizer.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                out[i] = " ".join(text.split()) or prompts[i][-200:]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a built-in encoder (minilm-l6), loaded on first use."""

    def __init__(self, name: str, max_length: int = 256, batch_size: int = 64):
        self.name, self.max_length, self.batch_size = name, max_length, batch_size
        self._base = None

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if self._base is None:
            self._base = load_base(self.name)
        model, tok = self._base.model, self._base.tokenizer
        model.eval()
        rows = []
        for s in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[s: s + self.batch_size]), padding=True, truncation=True,
                      max_length=self.max_length, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(torch.nn.functional.normalize(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float(), dim=-1))
        return torch.cat(rows) if rows else torch.empty(0, 0)


class GlobalRouter:
    """Expert embeddings computed once; `bias(queries)` -> [B, E] = scale x cosine(query, expert)."""

    def __init__(self, base, library: Library, config: RouteConfig | None = None,
                 encoder: SentenceEncoder | None = None, state=None):
        self.cfg = config or RouteConfig()
        library.require_experts()
        library.require_global_inputs()
        self.base, self.library, self.state = base, library, state
        self.encoder = encoder or SentenceEncoder(self.cfg.embedder)
        self.expert_instructions: list[str] = []
        c = self.cfg
        if c.global_from == "instruction":
            prompts = []
            for e in library.experts:
                shown = "\n".join(f"Input {i + 1}: {_clip(x, c.instruction_chars)}"
                                  for i, x in enumerate(e.examples[: c.instruction_examples]))
                prompts.append(EXPERT_PROMPT.format(description=e.description, examples=shown))
            self.expert_instructions = self._write(prompts)
            self.expert_emb = self.encoder(self.expert_instructions)
        else:
            embs = [self.encoder([_clip(x, c.instruction_chars) for x in e.examples]).mean(0) for e in library.experts]
            self.expert_emb = torch.nn.functional.normalize(torch.stack(embs), dim=-1)

    def _write(self, prompts: list[str]) -> list[str]:
        st = self.state
        old = st.enabled if st is not None else None
        if st is not None:
            st.enabled = False  # the instruction writer is the base model itself
        try:
            return write_instructions(self.base.model, self.base.tokenizer, prompts, self.cfg.instruction_tokens,
                                      batch_size=self.cfg.batch_size)
        finally:
            if st is not None:
                st.enabled = old

    def query_texts(self, queries: Sequence[str]) -> list[str]:
        """What is embedded for each query: its generated instruction, or the query itself."""
        c = self.cfg
        if c.global_from == "instruction":
            return self._write([QUERY_PROMPT.format(text=_clip(q, c.instruction_chars)) for q in queries])
        return [_clip(q, c.instruction_chars) for q in queries]

    def cosine(self, queries: Sequence[str]) -> torch.Tensor:
        """[B, E] cosine similarity of each query's embedding to each expert's."""
        return self.encoder(self.query_texts(queries)) @ self.expert_emb.T

    def bias(self, queries: Sequence[str]) -> torch.Tensor:
        return self.cfg.global_scale * self.cosine(queries)
