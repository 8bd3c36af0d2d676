"""Merging: methods on task vectors (methods.py), streamed checkpoint merges (stream.py), patch merges and the
`merged` kind (patches.py), mergekit-format plans (plan.py), Fisher estimation (fisher.py), Model-GLUE
selection (glue.py) and PortLLM porting (port.py)."""

from patchlm.merge.methods import METHODS, get_method, merge_method, merge_tensor
from patchlm.merge.plan import MergePlan, ModelEntry, load_plan, plan_from_config, plan_from_options

__all__ = ["METHODS", "get_method", "merge_method", "merge_tensor", "MergePlan", "ModelEntry", "load_plan",
           "plan_from_config", "plan_from_options"]
