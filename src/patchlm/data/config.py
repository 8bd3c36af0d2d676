"""DataConfig: the sanity checks on user data (local files, hub datasets) and how loudly they speak.

Clear mistakes are errors (one label, labels that look continuous, more classes than the rows can support);
suspicious but usable data (duplicates, empty texts) gives a DataWarning, which `data_warnings: false` silences.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from patchlm.errors import ConfigError
from patchlm.typed import check_fields


class DataWarning(UserWarning):
    """Usable but suspicious data (the CLI prints it as one `warning:` line)."""


@dataclass
class DataConfig:
    """Checks applied when a data file becomes a classification task."""

    max_labels: int = field(default=50, metadata={
        "help": "most distinct label values a classification file may have; more look like a continuous value "
                "or an id column"})
    data_warnings: bool = field(default=True, metadata={
        "help": "warn about dropped duplicate or empty rows in a data file (--no-data-warnings: quiet)"})

    def __post_init__(self):
        check_fields(self)
        if self.max_labels < 2:
            raise ConfigError(f"max_labels must be at least 2 (a classifier needs two classes), got {self.max_labels}",
                              field="max_labels")

    def warn(self, message: str) -> None:
        """Emit a DataWarning unless warnings are off."""
        if self.data_warnings:
            warnings.warn(message, DataWarning, stacklevel=3)
