"""Where patchlm keeps its cache, and atomic file/directory writes used by every writer."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from patchlm.errors import OutputExistsError


def home() -> Path:
    """The cache root: $PATCHLM_HOME, default ~/.cache/patchlm."""
    root = Path(os.environ.get("PATCHLM_HOME", Path.home() / ".cache" / "patchlm")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_output(path: str | Path, force: bool = False) -> Path:
    """Refuse an existing output path unless force; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it")
    return path


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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
