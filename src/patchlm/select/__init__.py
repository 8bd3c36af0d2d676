"""Data selection: SHED (Shapley-based dataset refinement) and the baseline selectors, one interface.

    from patchlm.select import SelectConfig, run_selection
    sel, subset, report = run_selection(task, SelectConfig(method="shed", utility="probe"), "subset.jsonl")

`patchlm train --task subset.jsonl` then trains on the chosen examples.
"""

from patchlm.select.config import METHODS, SAMPLERS, UTILITIES, SelectConfig
from patchlm.select.run import Selection, check_selection, run_selection, select_subset, subset_row, write_subset
from patchlm.select.shed import cluster, group_leave_out, members_by_distance, qocs, qwcs

__all__ = [
    "METHODS",
    "SAMPLERS",
    "UTILITIES",
    "SelectConfig",
    "Selection",
    "check_selection",
    "cluster",
    "group_leave_out",
    "members_by_distance",
    "qocs",
    "qwcs",
    "run_selection",
    "select_subset",
    "subset_row",
    "write_subset",
]
