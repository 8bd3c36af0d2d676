"""On-disk cache of parsed built-in datasets, so slow parsing happens once per machine."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CACHE_VERSION = "v1"


def patchlm_home() -> Path:
    """Root of patchlm's caches: $PATCHLM_HOME, else ~/.cache/patchlm (read at call time)."""
    env = os.environ.get("PATCHLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "patchlm"


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
    """Write atomically (temp file + os.replace); a read-only home just means no cache."""
    path = cache_path(name)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is ordinary data
        os.replace(tmp, path)
        return path
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
