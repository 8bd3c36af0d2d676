"""Base models: built-in names (offline packaged assets), local directories, GGUF files, hub ids."""

from patchlm.models.base import Base, fingerprint_state_dict, load_base, list_models, BUILTIN_MODELS

__all__ = ["Base", "load_base", "list_models", "fingerprint_state_dict", "BUILTIN_MODELS"]
