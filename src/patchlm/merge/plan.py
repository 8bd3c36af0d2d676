"""The typed merge plan that both a mergekit-format YAML and `patchlm merge` options parse into.

YAML (mergekit's format, for the methods both tools have):

    models:
      - model: path/to/finetuned-a
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/finetuned-b
        parameters: {weight: 0.5, density: 0.5}
    base_model: path/to/base
    merge_method: ties
    parameters: {normalize: true}
    dtype: float32

A parameter value is a number/bool, a gradient (a list of numbers interpolated over the layers, as mergekit),
or a list of `{filter: substring, value: ...}` conditions. A single `slices:` entry whose sources each cover
all layers is accepted as the same thing as `models:`. Anything patchlm does not implement is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchlm.errors import ConfigError, UnknownNameError, did_you_mean
from patchlm.merge.methods import METHODS, MergeMethod, get_method, validate_value

TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "slices", "seed"}
MERGEKIT_ONLY_KEYS = {"modules": "per-module merges", "tokenizer": "tokenizer surgery",
                      "chat_template": "chat template replacement"}
DTYPES = ("float32", "bfloat16", "float16")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ModelEntry:
    """One input: a checkpoint (dir, built-in name) or a patch dir, with its own parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergePlan:
    """What to merge and how; validated against the method's parameters when built."""

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = field(default=None, metadata={
        "help": "float32 | bfloat16 | float16: inputs are read as (none: as stored)"})
    out_dtype: str | None = field(default=None, metadata={"help": "dtype of the written weights (none: dtype)"})
    tokenizer_source: str | None = field(default=None, metadata={"help": "base or one of the models"})
    seed: int = field(default=0, metadata={"help": "seed for DARE's random drops"})
    layer_ranges: dict[str, list[int]] = field(default_factory=dict)  # from `slices:`, checked at merge time
    patches: bool = False  # the models are patch directories (merged through dW; their base is implied)

    # -- derived
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def inputs(self) -> list[ModelEntry]:
        """The models merged: every model for weight-space methods, the non-base ones otherwise."""
        if self.method.space == "weights" or self.patches:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, {}, [])}

    # -- per-tensor parameter values (mergekit's rules: the model's own setting first, then the global one)
    def params_for(self, tensor_name: str, num_layers: int) -> tuple[dict, list[dict]]:
        """(shared parameters, per-input parameters) evaluated for one tensor."""
        m = self.method
        t = layer_fraction(tensor_name, num_layers)
        shared = {}
        for key, p in m.params.items():
            v = evaluate_setting(self.parameters.get(key), tensor_name, t)
            shared[key] = p.default if v is None else v
        per_model = []
        for entry in self.inputs():
            d = {}
            for key, p in m.model_params.items():
                v = evaluate_setting(entry.parameters.get(key), tensor_name, t)
                if v is None:
                    v = evaluate_setting(self.parameters.get(key), tensor_name, t)
                d[key] = p.default if v is None else v
            per_model.append(d)
        return shared, per_model

    # -- checks
    def validate(self) -> MergePlan:
        if self.merge_method not in METHODS:
            raise UnknownNameError(f"merge_method {self.merge_method!r} is not implemented by patchlm; "
                                   f"{did_you_mean(self.merge_method, METHODS)}")
        m = self.method
        if not self.models:
            raise ConfigError("no models to merge: models is empty", field="models")
        names = [e.model for e in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"model {dup[0]} is listed twice")
        if m.needs_base and not self.base_model and not self.patches:
            raise ConfigError(f"merge method {m.name} needs a base model: set base_model", field="base_model")
        if m.space == "weights" and self.base_model and self.base_model not in names:
            raise ConfigError(f"merge method {m.name} averages the listed models; base_model {self.base_model} is "
                              "not among them: add it to models (with a weight) or drop base_model")
        if m.space == "pair" and self.patches and len(self.models) != 2:
            raise ConfigError(f"slerp merges exactly two patches, got {len(self.models)}")
        if m.space == "pair" and not self.patches and len(self.inputs()) != 1:
            listed = ", ".join([self.base_model or "?"] + [e.model for e in self.inputs()])
            raise ConfigError(f"slerp merges exactly two models (the base and one other), got "
                              f"{len(self.inputs()) + 1}: {listed}")
        if not self.inputs():
            raise ConfigError("nothing to merge: the only model listed is the base model")
        for key, val in self.parameters.items():
            _check_setting(m, key, val, "")
        for e in self.models:
            for key, val in e.parameters.items():
                if key not in m.model_params:
                    where = f" (model {e.model})"
                    if key in m.params:
                        raise ConfigError(f"{m.name} parameter {key!r} is shared by all models: set it under the "
                                          f"top-level parameters, not under model {e.model}")
                    validate_value(m, key, None, where)
                _check_setting(m, key, val, f" (model {e.model})")
        for key, p in m.params.items():
            if p.required and key not in self.parameters:
                raise ConfigError(f"merge method {m.name} needs parameter {key!r} (e.g. parameters: {{{key}: 0.5}})")
        for key, p in m.model_params.items():
            if p.required:
                for e in self.inputs():
                    if key not in e.parameters and key not in self.parameters:
                        raise ConfigError(f"merge method {m.name} needs parameter {key!r} for model {e.model}")
        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if v is not None and v not in DTYPES:
                raise ConfigError(f"{key} {v!r} is not supported; choices: {', '.join(DTYPES)}", field=key)
        if self.tokenizer_source is not None and self.tokenizer_source != "base" and self.tokenizer_source not in names:
            if self.tokenizer_source == "union":
                raise ConfigError("tokenizer_source: union (merging vocabularies) is not supported by patchlm; "
                                  "use base or one of the models")
            raise ConfigError(f"tokenizer_source {self.tokenizer_source!r} is not base or one of the models",
                              field="tokenizer_source")
        return self


def layer_fraction(tensor_name: str, num_layers: int) -> float:
    """mergekit's t for gradients: layer i of L gives i/(L-1); tensors outside the layers get 0."""
    m = _LAYER.search(tensor_name)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter setting's value for one tensor: scalar, gradient over layers, or first matching filter."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            x = t * (len(setting) - 1)
            i0 = int(x)
            i1 = min(len(setting) - 1, i0 + 1)
            f = x - i0
            return (1 - f) * setting[i0] + f * setting[i1]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond.get("value"), tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _check_setting(m: MergeMethod, key: str, val: Any, where: str) -> None:
    """Validate every value a setting can take (each gradient point, each filtered value)."""
    if key not in m.all_params():
        validate_value(m, key, None, where)  # raises naming the unknown parameter
    if isinstance(val, dict):
        val = [val]
    if isinstance(val, list) and val and all(isinstance(c, dict) for c in val):
        for c in val:
            extra = set(c) - {"filter", "value"}
            if extra or "value" not in c:
                raise ConfigError(f"{m.name} parameter {key}{where}: a condition needs `value` (and optional "
                                  f"`filter`), got keys {_names_of(c)}")
            if c.get("filter") is not None and not isinstance(c["filter"], str):
                raise ConfigError(f"{m.name} parameter {key}{where}: a condition's filter must be a tensor name "
                                  f"substring, got {_short(c['filter'])}")
            _check_setting(m, key, c["value"], where)
        return
    if isinstance(val, list):
        if not val:
            raise ConfigError(f"{m.name} parameter {key}{where}: empty list")
        for v in val:
            if isinstance(v, (list, dict)):
                raise ConfigError(f"{m.name} parameter {key}{where}: cannot mix conditions and gradient values")
            validate_value(m, key, v, where)
        return
    if key == "fisher" and isinstance(val, str):
        return
    validate_value(m, key, val, where)


# ---------------------------------------------------------------- builders
def _model_ref(v: Any, where: str) -> str:
    if isinstance(v, dict):
        raise ConfigError(f"{where}: mergekit's structured model references (model/lora dicts) are not supported; "
                          "give the model as a path or name")
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a model path or name, got {v!r}")
    if "+" in v and not Path(v).exists():
        raise ConfigError(f"model {v!r}: mergekit's `base+lora` references are not supported; bake the LoRA first "
                          "(patchlm export PATCH --format merged) or merge patches with --patch")
    return v


def _mapping(v: Any, where: str) -> dict:
    """A YAML mapping of names (None: empty); anything else is refused naming where it is."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where} must be a mapping of name: value, got {_short(v)}")
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a name")
    return dict(v)


def _names_of(keys) -> str:
    return ", ".join(sorted(map(str, keys)))


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def plan_from_config(cfg: dict) -> MergePlan:
    """A MergePlan from a parsed mergekit-format YAML mapping (refusing what patchlm does not implement)."""
    if not isinstance(cfg, dict):
        raise ConfigError("a merge config must be a YAML mapping with models, merge_method, ...")
    cfg = _mapping(cfg, "the merge config")
    for key in cfg:
        if key in MERGEKIT_ONLY_KEYS:
            raise ConfigError(f"mergekit option {key!r} ({MERGEKIT_ONLY_KEYS[key]}) is not supported by patchlm")
        if key not in TOP_KEYS:
            raise ConfigError(f"unsupported merge config option {key!r}; supported: {', '.join(sorted(TOP_KEYS))}")
    if "merge_method" not in cfg:
        raise ConfigError("the merge config has no merge_method")
    params = _mapping(cfg.get("parameters"), "parameters")
    base = cfg.get("base_model")
    base = _model_ref(base, "base_model") if base is not None else None
    models: list[ModelEntry] = []
    layer_ranges: dict[str, list[int]] = {}
    if cfg.get("models") and cfg.get("slices"):
        raise ConfigError("give either models or slices, not both")
    if cfg.get("slices"):
        slices = cfg["slices"]
        if not isinstance(slices, list) or len(slices) != 1:
            raise ConfigError("slices: only a single slice covering every layer is supported (layer stacking / "
                              "frankenmerges are not); use models: instead")
        sl = _mapping(slices[0], "slices[0]")
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if extra:
            raise ConfigError(f"unsupported slice option(s) {_names_of(extra)}")
        params = {**params, **_mapping(sl.get("parameters"), "slices[0].parameters")}
        if sl.get("base_model"):
            base = _model_ref(sl["base_model"], "slices[0].base_model")
        sources = sl.get("sources") or []
        if not isinstance(sources, list):
            raise ConfigError(f"slices[0].sources must be a list of {{model: ..., layer_range: [...]}}, got "
                              f"{_short(sources)}")
        for i, src in enumerate(sources):
            src = _mapping(src, f"slices[0].sources[{i}]")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(f"unsupported option(s) {_names_of(extra)} in slices[0].sources[{i}]")
            ref = _model_ref(src.get("model"), f"slices[0].sources[{i}]")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and lr[0] == 0 and isinstance(lr[1], int)
                    and not isinstance(lr[1], bool)):
                raise ConfigError(f"slices[0].sources[{i}] layer_range {lr!r}: only full ranges [0, num_layers] "
                                  "are supported")
            layer_ranges[ref] = list(lr)
            models.append(ModelEntry(ref, _mapping(src.get("parameters"), f"slices[0].sources[{i}].parameters")))
    else:
        raw = cfg.get("models") or []
        if not isinstance(raw, list):
            raise ConfigError("models must be a list of {model: ..., parameters: {...}}")
        for i, e in enumerate(raw):
            if isinstance(e, str):
                e = {"model": e}
            if not isinstance(e, dict):
                raise ConfigError(f"models[{i}] must be a mapping with `model`")
            e = _mapping(e, f"models[{i}]")
            extra = set(e) - {"model", "parameters"}
            if extra:
                raise ConfigError(f"unsupported option(s) {_names_of(extra)} in models[{i}]")
            models.append(ModelEntry(_model_ref(e.get("model"), f"models[{i}]"),
                                     _mapping(e.get("parameters"), f"models[{i}].parameters")))
    method = cfg["merge_method"]
    if not isinstance(method, str):
        raise ConfigError(f"merge_method must be a method name, got {_short(method)}")
    for key in ("dtype", "out_dtype", "tokenizer_source"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{key} must be a name, got {_short(cfg[key])}", field=key)
    if method not in METHODS:
        raise UnknownNameError(f"merge_method {method!r} is not implemented by patchlm; "
                               f"{did_you_mean(method, METHODS)}")
    is_patch = [(Path(m.model) / "patch.json").exists() for m in models]
    patches = bool(models) and all(is_patch)
    if any(is_patch) and not patches:
        first = models[is_patch.index(True)].model
        raise ConfigError(f"{first} is a patch but other inputs are checkpoints: merge patches with patches "
                          "(or bake it first: patchlm export --format merged)")
    if patches and base:
        raise ConfigError("base_model is implied by the patches (they record their base): drop base_model")
    # mergekit adds the base model as an input when it is not listed; so do we (it is excluded from deltas).
    if base and get_method(method).space != "weights" and base not in [m.model for m in models]:
        models.insert(0, ModelEntry(base))
    seed = cfg.get("seed", MergePlan.seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}", field="seed")
    plan = MergePlan(merge_method=method, models=models, base_model=base, parameters=params,
                     dtype=cfg.get("dtype"), out_dtype=cfg.get("out_dtype"),
                     tokenizer_source=cfg.get("tokenizer_source"), seed=seed, layer_ranges=layer_ranges,
                     patches=patches)
    return plan.validate()


def load_plan(path: str | Path) -> MergePlan:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"merge config {p} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
    return plan_from_config(cfg)


def _per_model(values: list | None, n: int, name: str) -> list:
    if not values:
        return [None] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise ConfigError(f"got {len(values)} {name} values for {n} models: give one per model (or one for all)",
                          field=name)
    return list(values)


def plan_from_options(models: list[str], method: str, base: str | None = None,
                      weights: list[float] | None = None, densities: list[float] | None = None,
                      gammas: list[float] | None = None, params: dict | None = None, dtype: str | None = None,
                      out_dtype: str | None = None, tokenizer_source: str | None = None,
                      seed: int = MergePlan.seed) -> MergePlan:
    """The same MergePlan from CLI options (per-model --weight/--density/--gamma in --model order)."""
    cfg_models = []
    ws, ds, gs = (_per_model(weights, len(models), "weight"), _per_model(densities, len(models), "density"),
                  _per_model(gammas, len(models), "gamma"))
    for m, w, d, g in zip(models, ws, ds, gs):
        p = {k: v for k, v in (("weight", w), ("density", d), ("gamma", g)) if v is not None}
        cfg_models.append({"model": m, **({"parameters": p} if p else {})})
    cfg = {"models": cfg_models, "merge_method": method, "seed": seed}
    for k, v in (("base_model", base), ("parameters", params), ("dtype", dtype), ("out_dtype", out_dtype),
                 ("tokenizer_source", tokenizer_source)):
        if v:
            cfg[k] = v
    return plan_from_config(cfg)


def parse_param(text: str) -> tuple[str, Any]:
    """`key=value` from the CLI, the value read as YAML (numbers, true/false, lists)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"parameter {text!r}: expected key=value (e.g. lambda=0.8)", field="parameters")
    k, v = text.split("=", 1)
    try:
        return k.strip(), yaml.safe_load(v)
    except yaml.YAMLError as e:
        raise ConfigError(f"parameter {text!r}: the value is not valid YAML", field="parameters") from e
