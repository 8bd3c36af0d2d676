"""Turn task examples into (input_ids, labels) for the three objectives.

- classification: prompt + the gold label's verbalizer; loss on the verbalizer tokens only
- lm: raw text packed into fixed blocks; loss on every token
- chat: the model's chat template; loss on assistant turns only
"""

from __future__ import annotations

from patchlm.errors import ConfigError, DataError

IGNORE = -100


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
    from patchlm.evaluate.classify import encode_prompt, encode_verbalizers

    verbs = encode_verbalizers(tokenizer, task)
    longest = max(len(v) for v in verbs)
    out = []
    for e in examples:
        p = encode_prompt(tokenizer, task, e, max_length, reserve=longest)
        v = verbs[int(e["label"])]
        out.append({"input_ids": p + v, "labels": [IGNORE] * len(p) + v})
    return out


def lm_features(task, examples, tokenizer, max_length: int) -> list[dict]:
    from patchlm.evaluate.perplexity import pack_blocks

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


def build_features(task, split: str, tokenizer, objective: str, max_length: int, limit: int | None = None) -> list[dict]:
    examples = task.split(split)
    if limit:
        examples = examples[:limit]
    fn = {"classification": classification_features, "lm": lm_features, "chat": chat_features}[objective]
    feats = fn(task, examples, tokenizer, max_length)
    if not feats:
        raise DataError(f"task {task.name} split {split} gives no training examples for objective {objective}")
    return feats
