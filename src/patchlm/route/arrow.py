"""Arrow routing through PEFT's own implementation (`peft.ArrowConfig`, `create_arrow_model`), not a copy.

Each expert is exported to a PEFT LoRA directory (adapters/peft_io), PEFT builds one prototype per adapter and
module (the top right singular vector of B A, by power iteration) and routes each token by |x . prototype| (the
docs say cosine; the code uses an absolute dot product with unnormalised tokens), top-k, softmax. PEFT requires
the experts to share their rank and target modules: checked here first, naming the experts that differ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from patchlm.adapters.lora import lora_modules_from_tensors
from patchlm.adapters.peft_io import export_peft
from patchlm.errors import ConfigError
from patchlm.route.config import RouteConfig


def check_compatible(names: list[str], patches) -> None:
    """Arrow (PEFT) needs one rank and one set of target modules across the experts."""
    shapes = []
    for p in patches:
        mods = lora_modules_from_tensors(p.tensors)
        shapes.append((tuple(sorted(mods)), tuple(sorted({a.shape[0] for a, _ in mods.values()}))))
    for n, s in zip(names[1:], shapes[1:]):
        if s != shapes[0]:
            what = "rank" if s[0] == shapes[0][0] else "target modules"
            raise ConfigError(f"Arrow (PEFT) needs experts of one rank and one set of target modules: expert {n} "
                              f"differs from {names[0]} in its {what}", field="router")


class ArrowModel:
    """`with ArrowModel(base, names, patches, cfg) as model:` a PEFT Arrow model over base.model, unloaded after."""

    def __init__(self, base, names: list[str], patches, config: RouteConfig | None = None):
        cfg = config or RouteConfig()
        if cfg.top_k > len(patches):
            raise ConfigError(f"top_k {cfg.top_k} is larger than the library's {len(patches)} experts", field="top_k")
        check_compatible(names, patches)
        self.base, self.names, self.patches, self.cfg = base, names, patches, cfg
        self.model = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self):
        from peft import ArrowConfig, create_arrow_model

        self._tmp = tempfile.TemporaryDirectory(prefix="patchlm-arrow-")
        paths = []
        for i, p in enumerate(self.patches):
            paths.append(str(export_peft(p, Path(self._tmp.name) / f"expert{i}")))
        arrow = ArrowConfig(top_k=self.cfg.top_k, router_temperature=self.cfg.arrow_temperature,
                            rng_seed=self.cfg.seed)
        self.model = create_arrow_model(self.base.model, paths, arrow)
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.model is not None:
            self.base.model = self.model.unload()
            self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()
        return False
