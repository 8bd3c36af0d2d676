"""Layer dropping (LLM-Drop) and dynamic depth (MindSkip routers): scores, plans, real removal, routers.

The names below load on first use, so `patchlm.depth.config` (read by the CLI to build its options) imports
without torch.
"""

from importlib import import_module

_EXPORTS = {
    "FAMILIES": "arch",
    "UnsupportedModelError": "arch",
    "DropConfig": "config",
    "SkipConfig": "config",
    "DropKind": "drop",
    "drop_patch": "drop",
    "export_hf": "drop",
    "kv_cache_bytes": "drop",
    "make_plan": "drop",
    "calibration_blocks": "scores",
    "similarity_scores": "scores",
    "span_similarity": "scores",
    "Router": "skip",
    "RouterKind": "skip",
    "train_routers": "skip",
    "prefill_flops": "skip",
    "speed_bound": "skip",
    "speedup_at": "skip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'patchlm.depth' has no attribute {name!r}")
    return getattr(import_module(f"patchlm.depth.{_EXPORTS[name]}"), name)
