"""The Task record every trainer and evaluator consumes, plus de-duplication and seeded splitting."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from patchlm.errors import ConfigError, DataError, UnknownNameError, did_you_mean

KINDS = ("classification", "text", "chat", "qa")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                 "dev": "validation", "test": "test"}
DEFAULT_RATIOS = (0.8, 0.1, 0.1)

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Key used to spot duplicates: stripped, whitespace collapsed, casefolded."""
    return _WS.sub(" ", text).strip().casefold()


def clean_text(text: str, keep_newlines: bool = False) -> str:
    """Tidy stored text: strip, collapse whitespace (optionally keeping one newline between lines)."""
    if not keep_newlines:
        return _WS.sub(" ", text).strip()
    lines = (re.sub(r"[^\S\n]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def truncate_words(text: str, max_chars: int | None) -> str:
    """Cut text to at most max_chars, at a word boundary when one is reasonably close."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= max_chars // 2:
        cut = cut[:space]
    return cut.rstrip()


def first_user_message(example: dict) -> str:
    """The first user turn of a chat example ('' when there is none)."""
    for message in example.get("messages", ()):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def dedup_key(example: dict, kind: str) -> str:
    """The normalised text that decides whether two examples are the same (and must share a split)."""
    if kind == "qa":
        return normalize_text(example.get("question") or first_user_message(example))
    if kind == "chat":
        return normalize_text(first_user_message(example))
    return normalize_text(example["text"])


def deduplicate(examples: Iterable[dict], kind: str) -> list[dict]:
    """Keep the first copy of each normalised text; drop every copy of a text whose labels disagree."""
    first: dict[str, dict] = {}
    conflicting: set[str] = set()
    for ex in examples:
        key = dedup_key(ex, kind)
        if not key:
            continue
        if key not in first:
            first[key] = ex
        elif kind == "classification" and first[key]["label"] != ex["label"]:
            conflicting.add(key)
    return [ex for key, ex in first.items() if key not in conflicting]


def check_ratios(split_ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, validation, test) ratios and scale them to sum to 1."""
    try:
        ratios = tuple(float(r) for r in split_ratios)
    except (TypeError, ValueError):
        raise ConfigError(f"split_ratios must be three numbers (train, validation, test), "
                          f"got {split_ratios!r}") from None
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ConfigError(f"split_ratios must be three non-negative numbers with a positive sum, "
                          f"got {split_ratios!r}; e.g. (0.8, 0.1, 0.1)")
    total = sum(ratios)
    return ratios[0] / total, ratios[1] / total, ratios[2] / total


def split_examples(examples: Sequence[dict], seed: int = 0,
                   split_ratios: Sequence[float] = DEFAULT_RATIOS
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """Shuffle with random.Random(seed) and cut into train/validation/test by the ratios."""
    r_train, r_val, _ = check_ratios(split_ratios)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = round(n * r_train)
    n_val = min(round(n * r_val), n - n_train)
    shuffled = [examples[i] for i in order]
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def cap_splits(splits: Sequence[list[dict]], max_examples: int | None) -> list[list[dict]]:
    """Shrink the splits in proportion so together they hold at most max_examples (first items kept)."""
    if max_examples is None:
        return list(splits)
    if max_examples < 1:
        raise ConfigError(f"max_examples must be a positive integer, got {max_examples!r}")
    total = sum(len(s) for s in splits)
    if total <= max_examples:
        return list(splits)
    sizes = [int(len(s) * max_examples / total) for s in splits]
    # Hand out what flooring left over, largest remainders first, never beyond a split's length.
    rest = max_examples - sum(sizes)
    wanted = [len(s) * max_examples / total for s in splits]
    by_remainder = sorted(range(len(splits)), key=lambda i: sizes[i] - wanted[i])
    for i in by_remainder:
        if rest == 0:
            break
        if sizes[i] < len(splits[i]):
            sizes[i] += 1
            rest -= 1
    return [list(s[:k]) for s, k in zip(splits, sizes)]


@dataclass
class Task:
    """A dataset ready for patch training and evaluation: three disjoint splits and how to prompt them."""

    name: str
    kind: str
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    labels: list[str] = field(default_factory=list)
    verbalizers: list[str] = field(default_factory=list)
    template: str = "{text}"
    source: str = ""
    license: str = ""
    description: str = ""
    seed: int = 0
    max_chars: int | None = None

    def __post_init__(self) -> None:
        """Reject inconsistent tasks early (bad kind, labels without verbalizers, template without {text})."""
        if self.kind not in KINDS:
            raise _unknown_kind(self.kind)
        if self.kind == "classification":
            if not self.labels:
                raise DataError(f"classification task {self.name!r} has no labels")
            if len(self.verbalizers) != len(self.labels):
                raise DataError(f"task {self.name!r} has {len(self.labels)} labels but "
                                f"{len(self.verbalizers)} verbalizers")
        if "{text}" not in self.template:
            raise DataError(f"task {self.name!r}: template {self.template!r} has no '{{text}}' placeholder")

    def prompt(self, example: dict) -> str:
        """The classification prompt for one example (text cut to max_chars); verbalizers follow it."""
        if "text" in example:
            text = example["text"]
        elif "question" in example:
            text = example["question"]
        else:
            raise DataError(f"task {self.name!r} ({self.kind}) examples have no 'text'; "
                            f"use example['messages'] for chat data")
        return self.template.replace("{text}", truncate_words(text, self.max_chars))

    def split(self, name: str) -> list[dict]:
        """One split by name: 'train', 'validation' (or 'val') or 'test'."""
        key = SPLIT_ALIASES.get(name.strip().lower())
        if key is None:
            raise DataError(f"unknown split {name!r}; {did_you_mean(name, SPLIT_ALIASES)}")
        return getattr(self, key)

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {s: len(getattr(self, s)) for s in SPLITS}

    def info(self) -> dict:
        """Summary for printing and for patch metadata (no examples)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "verbalizers": list(self.verbalizers),
            "sizes": self.sizes,
            "total": sum(self.sizes.values()),
            "seed": self.seed,
            "source": self.source,
            "license": self.license,
            "description": self.description,
        }

    def __repr__(self) -> str:
        """Short form: examples are not printed."""
        sizes = "/".join(str(n) for n in self.sizes.values())
        return f"Task(name={self.name!r}, kind={self.kind!r}, labels={self.labels!r}, train/val/test={sizes})"


def _unknown_kind(kind: str) -> UnknownNameError:
    """The error for a task kind outside KINDS."""
    return UnknownNameError(f"unknown task kind {kind!r}; {did_you_mean(kind, KINDS)}")


def build_task(examples: Sequence[dict], *, name: str, kind: str, seed: int = 0,
               split_ratios: Sequence[float] = DEFAULT_RATIOS, max_examples: int | None = None,
               deduplicated: bool = False, **meta) -> Task:
    """De-duplicate (unless already done), split with the seed, cap, and wrap into a Task."""
    if kind not in KINDS:
        raise _unknown_kind(kind)
    unique = list(examples) if deduplicated else deduplicate(examples, kind)
    if not unique:
        raise DataError(f"task {name!r} has no usable examples")
    train, validation, test = cap_splits(split_examples(unique, seed, split_ratios), max_examples)
    return Task(name=name, kind=kind, train=train, validation=validation, test=test, seed=seed, **meta)
