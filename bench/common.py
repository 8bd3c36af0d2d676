"""Shared benchmark plumbing: machine description, per-row cache with resume, and result pages.

Every study writes docs/benchmarks/<study>.json ({"study","command","machine","date","rows"}) and a .md page.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
CACHE = ROOT / "bench" / ".cache"  # large intermediates (trained patches, embeddings): this machine only
# Finished rows are results: they are committed (bench/rows/), so a study resumes in the next session's fresh
# checkout instead of starting over (bench/.cache is ignored and does not travel).
ROWS = ROOT / "bench" / "rows"


def machine() -> str:
    """One line: CPU model, cores, memory, torch version, device."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {dev}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


class RowCache:
    """Finished rows of a study, one JSON file each, so an interrupted study resumes where it stopped."""

    _held = False  # this process holds $PATCHLM_BENCH_LOCK (flock on a second descriptor would deadlock)

    def __init__(self, study: str, tag: str = "full", committed: bool = False):
        """committed: the rows are pure results (nothing of this machine's bench/.cache is needed to use a cached
        row), kept under bench/rows/ and committed; a study whose rows stand for artifacts in bench/.cache (a
        trained patch, a built model) keeps them there, so a fresh checkout rebuilds the artifact. Quick runs
        are never committed."""
        committed = committed and tag != "quick"
        self.dir = (ROWS if committed else CACHE) / study / tag
        self.old = CACHE / study / tag  # where committed rows lived before bench/rows/: read, then moved over
        self.dir.mkdir(parents=True, exist_ok=True)

    def _f(self, key: str, where: Path | None = None) -> Path:
        return (where or self.dir) / (key.replace("/", "_") + ".json")

    def get(self, key: str) -> dict | None:
        f = self._f(key)
        if not f.exists() and self.old != self.dir and self._f(key, self.old).exists():
            return self.put(key, json.loads(self._f(key, self.old).read_text()))
        return json.loads(f.read_text()) if f.exists() else None

    def put(self, key: str, row: dict) -> dict:
        tmp = self._f(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(row, separators=(",", ":"), default=str) + "\n")
        os.replace(tmp, self._f(key))
        return row

    def run(self, key: str, fn) -> dict:
        """The cached row for key, or fn() computed now and cached. With $PATCHLM_BENCH_LOCK set to a file, each
        computed row holds an exclusive lock on it, so a long study shares the machine row by row with other
        heavy jobs that take the same lock (e.g. `flock FILE pytest ...`) instead of running beside them."""
        hit = self.get(key)
        if hit is not None:
            return hit
        with bench_lock():
            return self.put(key, fn())


@contextlib.contextmanager
def bench_lock():
    """Hold $PATCHLM_BENCH_LOCK (when set) for the block, so heavy work shares the machine with other heavy jobs
    that take the same lock (e.g. `flock FILE pytest ...`) instead of running beside them. Re-entrant within a
    process (flock on a second descriptor of the same file would deadlock)."""
    lock = os.environ.get("PATCHLM_BENCH_LOCK")
    if not lock or RowCache._held:
        yield
        return
    import fcntl

    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        RowCache._held = True
        try:
            yield
        finally:
            RowCache._held = False
            fcntl.flock(f, fcntl.LOCK_UN)


# every page links the plots of all studies (`make report` writes them; the HTML is generated, not committed)
PLOTS_LINE = ("- plots: [`report.html`](report.html), every study's rows as plots, written by `make report` "
              "(`patchlm report docs/benchmarks/ --out docs/benchmarks/report.html --force`)")


def json_safe(obj):
    """obj with every non-finite float (inf, nan) as None: the page's JSON is strict JSON (`Infinity` is Python's
    extension, which jq, browsers and most parsers refuse). The markdown table keeps `inf` where it means something,
    e.g. a non-private row's epsilon."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_results(study: str, rows: list[dict], markdown: str, extra: dict | None = None,
                  suffix: str = "", cmd: str | None = None) -> tuple[Path, Path]:
    """Write docs/benchmarks/<study><suffix>.json and .md (the md gets a header with machine/command/date).
    `cmd` names the measuring command when the page is rewritten from cached rows by another one."""
    if not rows:  # DESIGN.md's benchmark JSON holds measured rows: a study with none has no page yet
        raise ValueError(f"{study}: no measured row, no page written (run the study first)")
    DOCS.mkdir(parents=True, exist_ok=True)
    meta = {"study": study, "command": cmd or command(), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    data = {**meta, **(extra or {}), "rows": rows}
    jf, mf = DOCS / f"{study}{suffix}.json", DOCS / f"{study}{suffix}.md"
    jf.write_text(json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n")
    head = (f"# Benchmark: {study}\n\n- machine: {meta['machine']}\n- command: `{meta['command']}`\n"
            f"- date: {meta['date']}\n- raw rows: [`{jf.name}`]({jf.name})\n{PLOTS_LINE}\n\n")
    mf.write_text(head + markdown.strip() + "\n")
    return jf, mf


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    """A markdown table of the given columns (floats to 4 significant digits unless fmt says otherwise)."""
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if c in fmt:
            return fmt[c](v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
