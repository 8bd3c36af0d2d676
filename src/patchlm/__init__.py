"""patchlm: the whole life of LLM patches (train, merge, port, federate, slim)."""

__version__ = "0.1.0"

from patchlm.errors import PatchlmError  # noqa: F401
