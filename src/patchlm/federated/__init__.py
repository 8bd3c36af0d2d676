"""Federated fine-tuning of LoRA patches: the run's typed configs (config.py: FedConfig, DPConfig), aggregation
rules (rules.py), seeds and scalars instead of tensors (seeds.py: FedKSeed, Ferret), Flower apps (flower/),
post-quantum signing of updates (signing.py) and client-side differential privacy on the training engine
(privacy.py)."""

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
