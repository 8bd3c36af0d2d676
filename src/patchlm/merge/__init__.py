"""Merging: methods on task vectors (methods.py, registered by signature), streamed checkpoint merges (stream.py),
the `merged` kind (merged.py), patch merges (patch_merge.py) and the runner that loads and saves (runner.py),
mergekit-format plans (plan.py), run knobs (config.py), Fisher estimation (fisher.py), Model-GLUE selection
(glue.py, pure; glue_runner.py, evaluation and I/O) and PortLLM porting (port.py)."""

from patchlm.merge.methods import METHODS, get_method, merge_method, merge_tensor
from patchlm.merge.plan import MergePlan, ModelEntry, load_plan, plan_from_config, plan_from_options

__all__ = ["METHODS", "MergePlan", "ModelEntry", "get_method", "load_plan", "merge_method", "merge_tensor",
           "plan_from_config", "plan_from_options"]
