"""Federated fine-tuning of LoRA patches: aggregation rules (rules.py), Flower apps (flower/), post-quantum
signing of updates (signing.py) and client-side differential privacy (privacy.py)."""

from patchlm.federated.rules import (
                                     RULES,
                                     ClientUpdate,
                                     GlobalLoRA,
                                     aggregate,
                                     aggregation_error,
                                     data_weights,
                                     update_from_patch,
                                     update_from_tensors,
)

__all__ = ["RULES", "ClientUpdate", "GlobalLoRA", "aggregate", "aggregation_error", "data_weights",
           "update_from_patch", "update_from_tensors"]
