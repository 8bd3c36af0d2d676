"""Entry point: builds the typer app from every command module and turns errors into one line + exit 2."""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="patchlm: train, merge, port, federate and slim LLM patches. "
                       "Add --debug anywhere (or set PATCHLM_DEBUG=1) to see tracebacks.")

# OS errors that come from the paths and machine the user chose (not from patchlm): exit 2 like other bad input.
INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC, errno.EROFS,
                errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOENT}
BUG_REPORT = ("this is a bug in patchlm, not your input: please report it with the command line and the traceback "
              "printed under PATCHLM_DEBUG=1")


def input_error(e: BaseException) -> str | None:
    """The one line for an exception caused by the user's paths or machine (a file, memory), None for a bug."""
    if isinstance(e, OSError) and e.errno in INPUT_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot use{where}: {e.strerror or e}"
    text = str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)):
        first = text.splitlines()[0] if text else type(e).__name__
        return (f"not enough memory ({first[:160]}); lower the rank, batch size, max length or number of "
                "examples")
    return None


def _register_all() -> None:
    """Add every command module's commands to the app, once (main() runs many times in one test process)."""
    import patchlm.cli as pkg

    if getattr(app, "_patchlm_registered", False):
        return
    app._patchlm_registered = True
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if mod in ("main", "common", "options"):
            continue
        module = importlib.import_module(f"patchlm.cli.{mod}")
        if hasattr(module, "register"):
            module.register(app)


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def _one_line_warnings() -> None:
    """patchlm's own warnings (DataWarning: suspicious data) print as one `warning:` line, not file:line noise."""
    import warnings

    from patchlm.data.config import DataWarning

    shown = warnings.showwarning
    if getattr(shown, "patchlm", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.patchlm = True
    warnings.showwarning = show
    warnings.simplefilter("always", DataWarning)


def main(argv: list[str] | None = None) -> None:
    from patchlm.errors import PatchlmError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PATCHLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _quiet()
    _one_line_warnings()
    _register_all()
    from patchlm.errors import TrainingInterrupted

    try:
        rv = app(args=argv, prog_name="patchlm", standalone_mode=False)
        if type(rv) is int and rv:  # non-standalone typer returns an Exit's code instead of exiting
            sys.exit(rv)
    except TrainingInterrupted as e:
        if debug:
            raise
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except PatchlmError as e:
        if debug:
            raise
        msg = str(e)
        from patchlm.cli.options import flag_for

        flag = flag_for(getattr(e, "field", None) or "")
        if flag and flag not in msg:
            msg += f" (option {flag})"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (a training run resumes with --resume)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # typer ships its own copy of click: recognise its exceptions by shape, not by class.
        name = type(e).__name__
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            print("aborted", file=sys.stderr)
            sys.exit(130)
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # usage errors: bad option or value
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            print(f"error: {msg} (see --help)", file=sys.stderr)
            sys.exit(2)
        if debug:
            raise
        line = input_error(e)
        if line:
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg[:200]}; {BUG_REPORT}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
