"""Layer dropping (LLM-Drop) and dynamic depth (MindSkip routers): scores, plans, real removal, routers."""

from patchlm.depth.arch import FAMILIES, UnsupportedModelError
from patchlm.depth.drop import DropKind, drop_patch, export_hf, kv_cache_bytes, make_plan
from patchlm.depth.scores import calibration_blocks, similarity_scores, span_similarity
from patchlm.depth.skip import Router, RouterKind, SkipConfig, train_routers

__all__ = [
           "FAMILIES",
           "DropKind",
           "Router",
           "RouterKind",
           "SkipConfig",
           "UnsupportedModelError",
           "calibration_blocks",
           "drop_patch",
           "export_hf",
           "kv_cache_bytes",
           "make_plan",
           "similarity_scores",
           "span_similarity",
           "train_routers",
]
