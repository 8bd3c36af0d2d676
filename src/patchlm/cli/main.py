"""Entry point: builds the typer app from every command module and turns errors into one line + exit 2."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="patchlm: train, merge, port, federate and slim LLM patches. "
                       "Add --debug anywhere to see tracebacks.")


def _register_all() -> None:
    import patchlm.cli as pkg

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
    debug = "--debug" in argv
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
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
