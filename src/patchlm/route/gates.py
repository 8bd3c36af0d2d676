"""Phatgoose gates: after each expert is trained, a gate vector per adapted module is trained with the expert (and
everything else) frozen: y = W x + sigmoid(x . g_e) s B_e A_e x, g_e zero-initialised (sigmoid 0.5), on the
expert's own training task through the engine's train_loop. After training each vector is standardised (LayerNorm
without affine), as the official code does before routing by LayerNorm(x) . g_e / sqrt(d).

Gates are saved in LIB/gates/ (gates.safetensors: `<module>` -> [E, d_in]; gates.json: the library id and the
expert order); each finished expert is kept in LIB/gates.partial/ so an interrupted training resumes there.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from patchlm.data.features import build_features, collate, objective_for, pad_id
from patchlm.errors import ConfigError, PatchFormatError
from patchlm.paths import atomic_dir, reject_constant, strict_json
from patchlm.route.config import RouteConfig
from patchlm.route.library import Library
from patchlm.route.routed import routed_modules
from patchlm.train.engine import train_loop
from patchlm.train.optim import make_optimizer

GATES_DIR = "gates"
PARTIAL_DIR = "gates.partial"
TENSORS = "gates.safetensors"
META = "gates.json"


@dataclass
class _OptConfig:
    """The AdamW settings of gate training (no weight decay: a decayed gate would drift towards 0.5)."""

    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999


def standardize(v: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine of a gate vector (a zero vector stays zero)."""
    return F.layer_norm(v.float(), (v.shape[-1],))


def _batches(feats: list[dict], pad: int, batch_size: int, seed: int) -> Callable[[int], list]:
    """batches(step): one collated micro-batch, a pure function of the step (seeded epoch permutations)."""
    n = len(feats)

    def at(step: int) -> list:
        epoch, pos = divmod(step * batch_size, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        idx = [order[(pos + i) % n] for i in range(min(batch_size, n))]
        return [collate([feats[i] for i in idx], pad)]

    return at


def train_gates(base, library: Library, tasks: dict, config: RouteConfig | None = None, force: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """Train every expert's gates on a model whose routed modules are installed (route.routed.install).

    tasks: expert name -> its training Task. Returns the gates directory."""
    cfg = config or RouteConfig()
    mods = routed_modules(base.model)
    if not mods:
        raise ConfigError("train_gates needs a model with the library's routed modules installed", field="library")
    state = next(iter(mods.values())).state
    missing = [n for n in library.names if n not in tasks]
    if missing:
        raise ConfigError(f"no training task for expert(s) {', '.join(missing)}: their gates train on the expert's "
                          "task (add the expert with --task NAME)", field="task")
    out = library.path / GATES_DIR
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: pass --force to train the gates again", field="gates")
    partial = library.path / PARTIAL_DIR
    lib_id = library.library_id
    if (partial / META).exists() and json.loads((partial / META).read_text()).get("library") != lib_id:
        shutil.rmtree(partial)  # left by a library whose experts have changed since
    partial.mkdir(parents=True, exist_ok=True)
    (partial / META).write_text(json.dumps({"library": lib_id}))
    pad = pad_id(base.tokenizer)
    from safetensors.torch import load_file, save_file

    for e, name in enumerate(library.names):
        done = partial / f"{e:03d}-{name}.safetensors"
        if done.exists():
            got = load_file(str(done))
            with torch.no_grad():
                for mname, m in mods.items():
                    m.gates[e].copy_(got[mname])
            continue
        task = tasks[name]
        feats = build_features(task, "train", base.tokenizer, objective_for(task), cfg.gate_max_length)
        params = [m.gates[e] for m in mods.values()]
        with torch.no_grad():
            for p in params:
                p.zero_()
        for p in params:
            p.requires_grad_(True)
        rule = make_optimizer("adamw", params, _OptConfig(lr=cfg.gate_lr))
        state.train_expert = e
        try:
            if log:
                log(f"gates: expert {name} ({e + 1}/{len(library.names)}), {cfg.gate_steps} steps")
            train_loop(base.model, rule, _batches(feats, pad, cfg.gate_batch_size, cfg.seed + e), cfg.gate_steps,
                       bf16=cfg.bf16, desc=f"gates {name}")
        finally:
            state.train_expert = None
            for p in params:
                p.requires_grad_(False)
            base.model.eval()
        with torch.no_grad():
            for p in params:
                p.copy_(standardize(p))
        save_file({mname: m.gates[e].detach().cpu().contiguous() for mname, m in mods.items()}, str(done))
    meta = {"library": lib_id, "experts": library.names, "steps": cfg.gate_steps, "lr": cfg.gate_lr,
            "batch_size": cfg.gate_batch_size, "max_length": cfg.gate_max_length, "seed": cfg.seed}
    with atomic_dir(out, force=force) as tmp:
        save_file({mname: m.gate_matrix().detach().cpu().contiguous() for mname, m in mods.items()},
                  str(tmp / TENSORS))
        (tmp / META).write_text(strict_json(meta, str(out / META), indent=2) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return out


def load_gates(model, library: Library, path: str | Path | None = None) -> dict:
    """Put trained gates into the routed modules, refusing gates trained for another library."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else library.path / GATES_DIR
    if not (d / META).is_file() or not (d / TENSORS).is_file():
        raise ConfigError(f"library {library.path} has no trained gates ({d} is missing): train them with "
                          f"`patchlm route gates {library.path}`", field="gates")
    try:
        meta = json.loads((d / META).read_text(), parse_constant=reject_constant)
    except ValueError as e:
        raise PatchFormatError(f"{d / META} is not valid JSON: {e}") from e
    if meta.get("library") != library.library_id:
        raise ConfigError(f"gates in {d} were trained for another library (id {meta.get('library')}, experts "
                          f"{', '.join(meta.get('experts') or [])}); library {library.path} has id "
                          f"{library.library_id}: train its own with `patchlm route gates {library.path} --force`",
                          field="gates")
    tensors = load_file(str(d / TENSORS))
    mods = routed_modules(model)
    for name, m in mods.items():
        g = tensors.get(name)
        if g is None or g.shape != (len(m.gates), m.base.in_features):
            raise PatchFormatError(f"{d / TENSORS} has no gates of shape {(len(m.gates), m.base.in_features)} for "
                                   f"module {name}")
        with torch.no_grad():
            for e in range(len(m.gates)):
                m.gates[e].copy_(g[e])
    return meta
