"""Base models: built-in names (offline packaged assets), local directories, GGUF files, hub ids."""

from patchlm.models.base import BUILTIN_MODELS, Base, fingerprint_state_dict, list_models, load_base

__all__ = ["BUILTIN_MODELS", "Base", "fingerprint_state_dict", "list_models", "load_base"]
