"""Where patchlm keeps its cache, and atomic file/directory writes used by every writer."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from patchlm.errors import OutputError, OutputExistsError, PatchlmError


def home(create: bool = True) -> Path:
    """The one cache root: $PATCHLM_HOME, default ~/.cache/patchlm (read at call time)."""
    env = os.environ.get("PATCHLM_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "patchlm"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def check_output(path: str | Path, force: bool = False) -> Path:
    """Refuse an existing output path unless force, and one that cannot be created; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it")
    check_writable(path)
    return path


def check_writable(path: str | Path) -> None:
    """Refuse an output path whose nearest existing ancestor is a file or not writable (before any work)."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {parent} is not writable; choose another output path")


@contextmanager
def atomic_dir(target: str | Path, force: bool = False):
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any error the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    check_output(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def set_aside(target: str | Path, keep_new: Callable[[Path], bool]):
    """`--force` without loss: move an existing `target` aside while the block rebuilds it.

    On success the old copy is deleted. On failure it is deleted only if `keep_new(target)` says the new one is
    worth keeping (e.g. a resumable checkpoint exists); otherwise the partial new `target` is removed and the old
    one is put back, so a run that fails on a bad option loses nothing."""
    target = Path(target)
    if not target.exists():
        yield
        return
    old = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    _remove(old)
    os.replace(target, old)
    try:
        yield
    except BaseException:
        if target.exists() and keep_new(target):
            _remove(old)
        else:
            _remove(target)
            os.replace(old, target)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write a file through a temporary sibling and a rename: readers see the old file or the new, never half.

    mode: the file's permissions (mkstemp makes 0o600; pass 0o644 for ordinary shared data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write a text file (UTF-8) through a temporary name and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def strict_json(obj, what: str, **kwargs) -> str:
    """json.dumps that refuses NaN and infinity (they are not JSON): a PatchlmError naming `what` and the key.

    kwargs go to json.dumps (indent, default, sort_keys...)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        if "out of range float" not in str(e).lower():
            raise
        where = _non_finite_key(obj)
        raise PatchlmError(f"refusing to write {what}: {where or 'a value'} is not a finite number "
                           "(NaN or infinity; the run diverged or an input holds one)") from None


def _non_finite_key(obj, prefix: str = "") -> str | None:
    """The dotted key of the first non-finite float inside nested dicts and lists, if any."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return prefix or "the value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_key(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def reject_constant(name: str):
    """json.loads(parse_constant=...) hook: NaN, Infinity and -Infinity are not JSON; refuse them."""
    raise ValueError(f"{name} is not valid JSON (non-finite numbers are not allowed)")

