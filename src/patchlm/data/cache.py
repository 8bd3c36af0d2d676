"""On-disk cache of parsed built-in datasets, so slow parsing happens once per machine."""

from __future__ import annotations

import json
from pathlib import Path

from patchlm.paths import atomic_write_text, home

CACHE_VERSION = "v1"


def patchlm_home() -> Path:
    """Root of patchlm's caches (patchlm.paths.home, not created here)."""
    return home(create=False)


def cache_path(name: str) -> Path:
    """Where the parsed, de-duplicated examples of one built-in dataset are kept."""
    return patchlm_home() / "data" / f"{name}-{CACHE_VERSION}.jsonl"


def read_cache(name: str) -> list[dict] | None:
    """The cached examples, or None when absent or unreadable (the caller then re-parses)."""
    path = cache_path(name)
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None


def write_cache(name: str, examples: list[dict]) -> Path | None:
    """Write atomically; a read-only home just means no cache."""
    path = cache_path(name)
    try:
        atomic_write_text(path, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples), mode=0o644)
        return path
    except OSError:
        return None
