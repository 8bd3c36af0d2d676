"""Classification by label log-likelihood: score each label's verbalizer after the prompt, pick the best.

When every verbalizer is one token (the built-in tasks are chosen so), one forward pass per example gives
all label scores; otherwise each (prompt, label) pair is scored in a batch.
"""

from __future__ import annotations

import torch

from patchlm.data.features import collate, encode_prompt, encode_verbalizers, pad_id
from patchlm.errors import DataError
from patchlm.evaluate.config import EvalConfig
from patchlm.models.parts import autocast, model_device


def _pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    b = collate([{"input_ids": s} for s in seqs], pad, labels=False)
    return b["input_ids"].to(device), b["attention_mask"].to(device)


@torch.no_grad()
def label_scores(model, tokenizer, task, examples: list[dict], batch_size: int = EvalConfig.batch_size,
                 max_length: int = EvalConfig.max_length,
                 bf16: bool = EvalConfig.bf16) -> torch.Tensor:
    """Log-likelihood of each label's verbalizer for each example: a tensor [N, num_labels]."""
    device = model_device(model)
    verbs = encode_verbalizers(tokenizer, task)
    longest = max(len(v) for v in verbs)
    prompts = [encode_prompt(tokenizer, task, e, max_length, reserve=longest) for e in examples]
    pad = pad_id(tokenizer)
    out = torch.empty(len(examples), len(verbs))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    single = all(len(v) == 1 for v in verbs)
    vids = torch.tensor([v[0] for v in verbs], device=device)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            if single:
                ids, mask = _pad([prompts[i] for i in idx], pad, device)
                with autocast(device, bf16):
                    logits = model(input_ids=ids, attention_mask=mask).logits
                last = mask.sum(1) - 1
                lp = torch.log_softmax(logits[torch.arange(len(idx), device=device), last].float(), -1)
                out[idx] = lp[:, vids].cpu()
                continue
            seqs, spans = [], []
            for i in idx:
                for v in verbs:
                    seqs.append(prompts[i] + v)
                    spans.append((len(prompts[i]), len(v)))
            ids, mask = _pad(seqs, pad, device)
            with autocast(device, bf16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits.float(), -1)
            scores = torch.empty(len(seqs))
            for j, (start, n) in enumerate(spans):
                pos = torch.arange(start - 1, start - 1 + n, device=device)
                scores[j] = lp[j, pos, ids[j, start: start + n]].sum().cpu()
            out[idx] = scores.view(len(idx), len(verbs))
    finally:
        model.train(was_training)
    return out


def macro_f1(y_true: list[int], y_pred: list[int], num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        if tp + fp + fn == 0:
            continue  # label absent from both truth and predictions
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def evaluate_classification(model, tokenizer, task, split: str = EvalConfig.split, limit: int | None = EvalConfig.limit,
                            batch_size: int = EvalConfig.batch_size, bf16: bool = EvalConfig.bf16,
                            max_length: int = EvalConfig.max_length,
                            examples: list[dict] | None = None) -> dict:
    """Accuracy and macro-F1 on a split (the first `limit` examples of it; splits are already shuffled)."""
    if task.kind != "classification":
        raise DataError(f"task {task.name} is {task.kind}, not classification")
    if examples is None:
        examples = task.split(split)
        if limit:
            examples = examples[:limit]
    if not examples:
        raise DataError(f"task {task.name} has no examples in split {split}")
    scores = label_scores(model, tokenizer, task, examples, batch_size=batch_size, max_length=max_length, bf16=bf16)
    pred = scores.argmax(-1).tolist()
    gold = [int(e["label"]) for e in examples]
    acc = sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)
    return {"accuracy": acc, "macro_f1": macro_f1(gold, pred, len(task.labels)), "n": len(gold), "split": split}
