"""Running a merge plan: the I/O around the pure merges (loading patches and the base, estimating or reading
Fisher information, writing the result). `patchlm merge` is `run_plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from patchlm.data import load_task
from patchlm.errors import ConfigError
from patchlm.merge.config import MergeConfig
from patchlm.merge.fisher import estimate_fisher
from patchlm.merge.patch_merge import PatchDeltas, check_same_base, merge_patches
from patchlm.merge.plan import MergePlan
from patchlm.merge.stream import merge_checkpoints
from patchlm.models import load_base
from patchlm.patch import Patch

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _fishers(plan: MergePlan, patches: list[Patch], base, config: MergeConfig, log: Log) -> list[dict]:
    """Each patch's diagonal Fisher: read from the .safetensors file its `fisher` parameter names, else estimated
    on the task it names (or the task the patch records)."""
    out = []
    for e, p in zip(plan.models, patches):
        f = e.parameters.get("fisher", plan.parameters.get("fisher"))
        if isinstance(f, str) and f.endswith(".safetensors"):
            out.append(load_file(f))
            continue
        task_name = f if isinstance(f, str) else p.provenance.get("task")
        if not task_name:
            raise ConfigError(f"patch {e.model} records no task: give its Fisher data with "
                              "parameters: {fisher: TASK} (or a .safetensors file)", field="fisher")
        log(f"Fisher of {e.model} on {task_name}")
        out.append(estimate_fisher(base, p, load_task(task_name), n_examples=config.fisher_examples,
                                   bf16=config.bf16))
    return out


def merge_patch_plan(plan: MergePlan, config: MergeConfig | None = None, force: bool = False,
                     log: Log | None = None) -> Patch:
    """Run a MergePlan whose models are patch directories (what `patchlm merge --patch ...` does)."""
    config = config or MergeConfig()
    log = log or _quiet
    plan.validate()
    if not plan.patches:
        raise ConfigError("this plan merges checkpoints, not patches")
    for where, d in [("parameters", plan.parameters)] + [(e.model, e.parameters) for e in plan.models]:
        for k, v in d.items():
            if isinstance(v, (list, dict)):
                raise ConfigError(f"parameter {k} of {where}: per-layer gradients and filters are supported for "
                                  "checkpoint merges only; give one value for patches", field=k)
    patches = [Patch.load(e.model) for e in plan.models]
    m = plan.method
    base_weights = fishers = None
    if m.space == "pair" or m.name == "fisher":
        check_same_base(patches, force=force)
        base = load_base(patches[0].base["name"])
        if m.space == "pair":
            mods = sorted({x for p in patches for x in PatchDeltas(p).modules})
            base_weights = {n: base.model.get_submodule(n).weight.detach().float().clone() for n in mods}
        else:
            fishers = _fishers(plan, patches, base, config, log)
    mps = [{k: v for k, v in e.parameters.items() if k != "fisher"} for e in plan.models]
    shared = {k: v for k, v in plan.parameters.items() if k != "fisher"}
    for mp in mps:
        for k in list(shared):
            if k in m.model_params:
                mp.setdefault(k, shared[k])
    shared = {k: v for k, v in shared.items() if k not in m.model_params}
    return merge_patches(patches, m, params=shared, model_params=mps, seed=plan.seed, base_weights=base_weights,
                         fishers=fishers, rank=config.rank, stack=config.stack, force=force,
                         names=[e.model for e in plan.models])


def run_plan(plan: MergePlan, out: str | Path, config: MergeConfig | None = None, force: bool = False,
             progress: bool = False, log: Log | None = None) -> dict:
    """Merge the plan's inputs into `out` (a patch directory for patches, a checkpoint directory otherwise) and
    return the report `patchlm merge` prints."""
    config = config or MergeConfig()
    if plan.patches:
        result = merge_patch_plan(plan, config, force=force, log=log)
        result.save(out, force=force)
        return {"out": str(out), "kind": result.kind, "merge_method": plan.merge_method,
                "patches": [e.model for e in plan.models], "trainable_params": result.trainable_params,
                **result.metrics}
    if config.rank is not None:
        raise ConfigError("rank re-factorizes patch merges; checkpoint merges write full weights", field="rank")
    return merge_checkpoints(plan, out, force=force, shard_bytes=config.shard_bytes, progress=progress)
