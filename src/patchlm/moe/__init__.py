"""Mixture-of-Experts: upcycling specialists into a Mixtral-style MoE (upcycle.py, router.py gate modes, train.py
router-only training, recipe.py mergekit-moe YAML) and Model-GLUE's model-, block- and FFN-level mixtures
(mixtures.py)."""

from patchlm.moe.config import GATE_MODES, MoeConfig
from patchlm.moe.upcycle import Expert, Upcycled, save_upcycled, upcycle

__all__ = ["GATE_MODES", "Expert", "MoeConfig", "Upcycled", "save_upcycled", "upcycle"]
