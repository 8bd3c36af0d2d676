"""From task examples to token ids: prompt encoding, verbalizers, packing, the three training objectives, and the
one collation and pad-id rule that training, evaluation and every method share.

- classification: prompt + the gold label's verbalizer; loss on the verbalizer tokens only
- lm: raw text packed into fixed blocks; loss on every token
- chat: the model's chat template; loss on assistant turns only
"""

from __future__ import annotations

import torch

from patchlm.errors import ConfigError, DataError

IGNORE = -100


def pad_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS token, else 0 (masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def encode_verbalizers(tokenizer, task) -> list[list[int]]:
    """Token ids of each label's verbalizer (never empty)."""
    ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in task.verbalizers]
    if any(len(i) == 0 for i in ids):
        raise DataError(f"task {task.name} has an empty verbalizer")
    return ids


def encode_prompt(tokenizer, task, example, max_length: int, reserve: int = 0) -> list[int]:
    """Token ids of the prompt, cut from the left so the question at its end survives."""
    ids = tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
    room = max_length - reserve
    return ids[-room:] if len(ids) > room else ids


def pack_blocks(tokenizer, texts: list[str], block_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Token blocks of exactly block_size (the tail shorter than a block is dropped unless it is all there is)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if max_tokens and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    blocks = [stream[i: i + block_size] for i in range(0, len(stream), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()
    return [b for b in blocks if len(b) > 1]


def collate(feats: list[dict], pad: int, labels: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and (unless labels=False) labels with IGNORE on padding."""
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad, dtype=torch.long)
    lab = torch.full((len(feats), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        if labels:
            lab[i, :k] = torch.tensor(f.get("labels", f["input_ids"]))
        mask[i, :k] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = lab
    return out



def objective_for(task, objective: str = "auto") -> str:
    if objective != "auto":
        if objective == "classification" and task.kind != "classification":
            raise ConfigError(f"task {task.name} is {task.kind}: it has no labels for the classification objective")
        return objective
    return {"classification": "classification", "text": "lm", "chat": "chat", "qa": "chat"}[task.kind]


def example_text(task, example: dict, tokenizer=None) -> str:
    """Plain text of an example (for LM training or perplexity)."""
    if "text" in example and task.kind != "classification":
        return example["text"]
    if "messages" in example:
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(example["messages"], tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
    if task.kind == "classification":
        return task.prompt(example) + task.verbalizers[int(example["label"])]
    raise DataError(f"cannot turn an example of task {task.name} into text")


def classification_features(task, examples, tokenizer, max_length: int) -> list[dict]:
    verbs = encode_verbalizers(tokenizer, task)
    longest = max(len(v) for v in verbs)
    out = []
    for e in examples:
        p = encode_prompt(tokenizer, task, e, max_length, reserve=longest)
        v = verbs[int(e["label"])]
        out.append({"input_ids": p + v, "labels": [IGNORE] * len(p) + v})
    return out


def lm_features(task, examples, tokenizer, max_length: int) -> list[dict]:
    blocks = pack_blocks(tokenizer, [example_text(task, e, tokenizer) for e in examples], max_length)
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def chat_features(task, examples, tokenizer, max_length: int) -> list[dict]:
    """Render each conversation with the chat template; only assistant turns carry labels."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the chat objective needs a tokenizer with a chat template (this base has none); "
                          "use --objective lm")
    out = []
    for e in examples:
        msgs = e["messages"]
        ids: list[int] = []
        labels: list[int] = []
        prev = ""
        for i in range(len(msgs)):
            text = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not text.startswith(prev):  # template not prefix-stable: fall back to whole-text LM
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                labels = list(ids)
                break
            seg = tokenizer(text[len(prev):], add_special_tokens=False)["input_ids"]
            ids += seg
            labels += seg if msgs[i]["role"] == "assistant" else [IGNORE] * len(seg)
            prev = text
        ids, labels = ids[:max_length], labels[:max_length]
        if any(x != IGNORE for x in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def build_features(task, split: str, tokenizer, objective: str, max_length: int,
                   limit: int | None = None) -> list[dict]:
    examples = task.split(split)
    if limit:
        examples = examples[:limit]
    fn = {"classification": classification_features, "lm": lm_features, "chat": chat_features}[objective]
    feats = fn(task, examples, tokenizer, max_length)
    if not feats:
        raise DataError(f"task {task.name} split {split} gives no training examples for objective {objective}")
    return feats
