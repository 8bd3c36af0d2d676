"""One exception family. Messages name the bad value and the fix; the CLI prints them as one line."""


class PatchlmError(Exception):
    """Base class of every error patchlm raises on bad input or state."""


class UnknownNameError(PatchlmError):
    """An unknown model, task, kind, method or module name."""


class BaseMismatchError(PatchlmError):
    """A patch was made for another base model."""


class PatchFormatError(PatchlmError):
    """A patch directory is missing a file, is corrupt, or has an unknown kind or version."""


class DataError(PatchlmError):
    """A dataset or data file cannot be read as asked (missing column, empty file...)."""


class ConfigError(PatchlmError):
    """A hyper-parameter or option is out of range or inconsistent.

    `field` names the config field at fault (e.g. "lr"); the CLI adds the flag that sets it to the message."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class OutputExistsError(PatchlmError):
    """An output path exists and --force was not given."""


class OutputError(PatchlmError):
    """An output path cannot be written (under a file, read-only, disk full)."""


def did_you_mean(name: str, choices) -> str:
    """A short hint listing the closest valid names."""
    import difflib

    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}? (choices: {', '.join(choices)})"
    return f"choices: {', '.join(choices)}"


class TrainingInterrupted(PatchlmError):
    """Training stopped on request before its last step; its checkpoint can be resumed.

    exit_code: what the CLI exits with (130 after Ctrl-C, 143 after SIGTERM, the shell's conventions)."""

    def __init__(self, message: str = "", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(PatchlmError):
    """The loss or a parameter became NaN or infinite; the last good checkpoint is kept."""
