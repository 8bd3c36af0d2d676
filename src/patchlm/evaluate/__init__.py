"""Evaluation: label log-likelihood classification, perplexity, and the speed/memory probes benchmarks share."""

from patchlm.data.features import encode_verbalizers
from patchlm.evaluate.classify import evaluate_classification, label_scores
from patchlm.evaluate.config import EvalConfig
from patchlm.evaluate.perplexity import perplexity
from patchlm.evaluate.probes import MemoryProbe, Timer, peak_rss_bytes

__all__ = ["EvalConfig", "MemoryProbe", "Timer", "encode_verbalizers", "evaluate", "evaluate_classification",
           "label_scores", "peak_rss_bytes", "perplexity"]


def evaluate(model, tokenizer, task, split: str = EvalConfig.split, limit: int | None = EvalConfig.limit,
             batch_size: int = EvalConfig.batch_size, bf16: bool = EvalConfig.bf16,
             max_length: int = EvalConfig.max_length) -> dict:
    """Metrics of `model` on a task split: accuracy/macro-F1 for classification, perplexity otherwise."""
    if task.kind == "classification":
        return evaluate_classification(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size,
                                       bf16=bf16, max_length=max_length)
    from patchlm.data.features import example_text

    examples = task.split(split)[: limit or None]
    texts = [example_text(task, e, tokenizer) for e in examples]
    return perplexity(model, tokenizer, texts, block_size=max_length, batch_size=max(1, batch_size // 2), bf16=bf16)
