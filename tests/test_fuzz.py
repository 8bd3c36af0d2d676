"""Fuzzing of everything a user hands patchlm: random mutations of patch.json and patch tensors, training recipes,
mergekit and mergekit-moe YAML, local data files, key files and registries, and federated messages.

The property, for every loader: a mutated input is either accepted or refused with an error of patchlm's family
(PatchlmError: exit 2 with one `error:` line at the CLI), never another exception or a traceback, and nothing is
written. Federated messages keep their own contract: a malformed reply or broadcast raises KeyError, ValueError
or TypeError (the server counts it as rejected), and signature checks return a verdict, never raise.

Budget: PATCHLM_FUZZ_EXAMPLES examples per target (default 25, derandomized so CI is reproducible); `make fuzz`
runs 2000 per target with fresh random seeds. PATCHLM_FUZZ_SHRINK=0 reports a failing example without shrinking it
(shrinking a mutated file can take minutes).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import randomize, run_cli
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from patchlm.errors import PatchlmError

_ENV = os.environ.get("PATCHLM_FUZZ_EXAMPLES")
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
FUZZ = settings(max_examples=int(_ENV or 25), deadline=None, database=None, derandomize=_ENV is None,
                report_multiple_bugs=False,
                phases=_PHASES if os.environ.get("PATCHLM_FUZZ_SHRINK") == "0" else [*_PHASES, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# ---------------------------------------------------------------- mutations
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31]),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUE = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=6)
TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"-", b"NaN", b"1e999", b"\x00", b"\xff", b"\n", b"null",
          b"'", b"!!python/object:os.system", b"&a *a", b"\t", b"0x"]


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


@st.composite
def mutated_tree(draw, obj):
    """obj (nested dicts and lists) after 1-3 edits: a value replaced, a key or entry dropped, one added."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(obj))))
        op = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if not path:
            if op == "replace":
                obj = draw(VALUE)
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if op == "replace":
            parent[path[-1]] = draw(VALUE)
        elif op == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUE)
        else:
            parent.insert(path[-1], draw(VALUE))
    return obj


@st.composite
def mutated_bytes(draw, data: bytes):
    """data after 1-4 byte edits: a bit flipped, truncated, a token or random bytes inserted, a chunk cut or copied."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "token", "insert", "delete", "copy"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del b[i:]
        elif op == "token":
            b[i:i] = draw(st.sampled_from(TOKENS))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 16))]
        elif b:
            j = draw(st.integers(0, len(b) - 1))
            b[i:i] = b[j:j + draw(st.integers(1, 32))]
    return bytes(b)


def json_text(obj) -> bytes:
    """json.dumps as Python writes it: NaN and Infinity appear as bare literals (which strict JSON refuses)."""
    return json.dumps(obj, default=str).encode()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def outcome(fn, *args, **kwargs):
    """fn's result, or the PatchlmError it raised; any other exception fails the example."""
    try:
        return fn(*args, **kwargs)
    except PatchlmError as e:
        return e


def check_cli(argv: list[str], capsys, allowed=(0, 2)) -> tuple[int, str]:
    code, _, err = run_cli(argv, capsys)
    assert code in allowed, (argv, code, err)
    assert "Traceback" not in err, err
    assert err.count("error:") == (1 if code == 2 else 0), err
    return code, err


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, the cache in tmp_path, and no model ever loaded (a loader that gets that far passed)."""
    import patchlm.data.local as local
    import patchlm.models as models

    class Reached(PatchlmError):
        pass

    def no_model(*a, **k):
        raise Reached("REACHED-MODEL-LOAD")

    def no_hub(name):
        raise PatchlmError(f"no network in the fuzz tests ({name})")

    monkeypatch.setenv("PATCHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(models, "load_base", no_model)
    monkeypatch.setattr(local, "_hub_load", no_hub)
    return Reached


# ---------------------------------------------------------------- patches
@pytest.fixture(scope="module")
def lora_patch(tmp_path_factory):
    """A saved rank-2 LoRA patch of tiny-random-llama with non-zero tensors (no training needed)."""
    from patchlm.adapters.lora import LoraKind
    from patchlm.models import load_base
    from patchlm.patch import Patch

    base = load_base("tiny-random-llama")
    kind = LoraKind()
    spec = kind.attach(base.model, {"r": 2, "alpha": 4, "targets": "qv"}, None, seed=0)
    randomize(kind.trainable_parameters(base.model))
    p = Patch(kind="lora", base=base.ref(), spec=spec, tensors=kind.state(base.model), metrics={"val_accuracy": 0.5})
    return p.save(tmp_path_factory.mktemp("fuzz") / "patch")


def _patch_consumers(d: Path, capsys) -> None:
    """Load, describe and apply a (mutated) patch: library calls and `patchlm info`."""
    from patchlm.models import load_base
    from patchlm.patch import Patch

    p = outcome(Patch.load, d)
    if not isinstance(p, PatchlmError):
        outcome(p.info)
        outcome(p.apply, load_base("tiny-random-llama"), force=True)
    check_cli(["info", str(d)], capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_patch_json(lora_patch, capsys, data):
    meta = json.loads((lora_patch / "patch.json").read_text())
    text = data.draw(st.one_of(mutated_tree(meta).map(json_text),
                               mutated_bytes((lora_patch / "patch.json").read_bytes())))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "patch"
        d.mkdir()
        (d / "tensors.safetensors").write_bytes((lora_patch / "tensors.safetensors").read_bytes())
        (d / "patch.json").write_bytes(text)
        before = snapshot(Path(tmp))
        _patch_consumers(d, capsys)
        assert snapshot(Path(tmp)) == before


def _mutated_header(draw, raw: bytes) -> bytes:
    """A safetensors file whose JSON header (dtypes, shapes, offsets) is mutated, its length field rewritten."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    new = json_text(draw(mutated_tree(header)))
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


@FUZZ
@given(data=st.data())
def test_fuzz_patch_tensors(lora_patch, capsys, data):
    raw = (lora_patch / "tensors.safetensors").read_bytes()
    meta = json.loads((lora_patch / "patch.json").read_text())
    if data.draw(st.booleans()):  # without the checksum, the safetensors reader itself meets the damage
        meta.pop("tensors_sha256")
    blob = _mutated_header(data.draw, raw) if data.draw(st.booleans()) else data.draw(mutated_bytes(raw))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "patch"
        d.mkdir()
        (d / "tensors.safetensors").write_bytes(blob)
        (d / "patch.json").write_text(json.dumps(meta))
        before = snapshot(Path(tmp))
        _patch_consumers(d, capsys)
        assert snapshot(Path(tmp)) == before


# ---------------------------------------------------------------- recipes and merge configs
def _data_file(d: Path) -> Path:
    f = d / "data.jsonl"
    rows = [{"text": f"{'good' if i % 2 else 'bad'} movie number {i}", "label": ["neg", "pos"][i % 2]}
            for i in range(48)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@FUZZ
@given(data=st.data())
def test_fuzz_train_recipe(offline, capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = {"model": "tiny-random-llama", "task": str(_data_file(tmp)), "method": "lora",
                  "spec": {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": "qv"},
                  "train": {"steps": 2, "lr": 1e-3, "batch_size": 4, "max_length": 64, "seed": 0}, "seed": 0}
        text = yaml.safe_dump(recipe).encode()
        text = data.draw(st.one_of(mutated_tree(recipe).map(lambda r: yaml.safe_dump(r).encode()),
                                   mutated_bytes(text)))
        (tmp / "recipe.yml").write_bytes(text)
        before = snapshot(tmp)
        check_cli(["train", "--config", str(tmp / "recipe.yml"), "--out", str(tmp / "run"), "-q"], capsys,
                  allowed=(2,))
        assert snapshot(tmp) == before


@FUZZ
@given(data=st.data())
def test_fuzz_mergekit_yaml(lora_patch, offline, monkeypatch, capsys, data):
    import patchlm.merge.runner as runner
    from patchlm.merge.plan import load_plan

    monkeypatch.setattr(runner, "run_plan", lambda *a, **k: (_ for _ in ()).throw(offline("REACHED-RUN")))
    cfg = data.draw(st.sampled_from([
        {"merge_method": "ties", "base_model": "tiny-random-llama", "dtype": "float32",
         "parameters": {"normalize": True},
         "models": [{"model": "tiny-random-llama", "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": "tiny-random-llama", "parameters": {"weight": 0.5, "density": 0.7}}]},
        {"merge_method": "linear", "models": [{"model": str(lora_patch), "parameters": {"weight": 1.0}},
                                              {"model": str(lora_patch), "parameters": {"weight": 0.5}}]},
        {"merge_method": "slerp", "base_model": "tiny-random-llama", "parameters": {"t": 0.5},
         "slices": [{"sources": [{"model": "tiny-random-llama", "layer_range": [0, 2]},
                                 {"model": "tiny-random-llama", "layer_range": [0, 2]}]}]},
    ]))
    text = data.draw(st.one_of(mutated_tree(cfg).map(lambda c: yaml.safe_dump(c).encode()),
                               mutated_bytes(yaml.safe_dump(cfg).encode())))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "merge.yml"
        f.write_bytes(text)
        before = snapshot(Path(tmp))
        outcome(load_plan, f)
        check_cli(["merge", str(f), "--out", str(Path(tmp) / "out")], capsys, allowed=(2,))
        assert snapshot(Path(tmp)) == before


@FUZZ
@given(data=st.data())
def test_fuzz_mergekit_moe_yaml(data):
    from patchlm.moe.config import MoeConfig
    from patchlm.moe.recipe import load_moe_recipe

    cfg = {"base_model": "tiny-random-llama", "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
           "experts": [{"source_model": "a", "positive_prompts": ["math"], "negative_prompts": ["poems"]},
                       {"source_model": "b", "positive_prompts": "code", "noise_scale": 0.01}]}
    text = data.draw(st.one_of(mutated_tree(cfg).map(lambda c: yaml.safe_dump(c).encode()),
                               mutated_bytes(yaml.safe_dump(cfg).encode())))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "moe.yml"
        f.write_bytes(text)
        before = snapshot(Path(tmp))
        res = outcome(load_moe_recipe, f)
        if not isinstance(res, PatchlmError):
            outcome(MoeConfig, **res[2])
        assert snapshot(Path(tmp)) == before


# ---------------------------------------------------------------- local data files
@FUZZ
@given(data=st.data())
def test_fuzz_local_data(offline, data):
    from patchlm.data import load_task

    rows = [{"text": f"{'great' if i % 2 else 'awful'} film, review {i}", "label": ["neg", "pos"][i % 2]}
            for i in range(40)]
    suffix = data.draw(st.sampled_from([".jsonl", ".csv"]))
    if suffix == ".jsonl":
        base = "".join(json.dumps(r) + "\n" for r in rows).encode()
        lines = mutated_tree(rows).map(lambda rs: "".join(json.dumps(r, default=str) + "\n"
                                                          for r in (rs if isinstance(rs, list) else [rs])).encode())
        text = data.draw(st.one_of(lines, mutated_bytes(base)))
    else:
        base = ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)).encode()
        text = data.draw(mutated_bytes(base))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"data{suffix}"
        f.write_bytes(text)
        before = snapshot(Path(tmp))
        t = outcome(load_task, str(f))
        if not isinstance(t, PatchlmError):
            outcome(t.info)
        assert snapshot(Path(tmp)) == before


# ---------------------------------------------------------------- keys, registries, signatures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from patchlm.federated.signing import KeyPair, KeyRegistry

    d = tmp_path_factory.mktemp("keys")
    kp = KeyPair.generate("mldsa")
    kp.save(d / "client-0.key")
    reg = KeyRegistry()
    reg.add("client-0", "mldsa", kp.public_key)
    reg.save(d / "registry.json")
    return d


@FUZZ
@given(data=st.data())
def test_fuzz_key_files_and_registries(keys, capsys, data):
    from patchlm.federated.signing import KeyPair, KeyRegistry

    which = data.draw(st.sampled_from(["client-0.key", "registry.json"]))
    raw = (keys / which).read_bytes()
    text = data.draw(st.one_of(mutated_tree(json.loads(raw)).map(json_text), mutated_bytes(raw)))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / which
        f.write_bytes(text)
        before = snapshot(Path(tmp))
        if which.endswith(".key"):
            kp = outcome(KeyPair.load, f)
            if not isinstance(kp, PatchlmError):
                outcome(kp.sign, b"message")
        else:
            outcome(KeyRegistry.load, f)
            # keygen refuses a broken registry before it writes the key file: nothing is half done
            code, _ = check_cli(["federate-keygen", "--out", str(Path(tmp) / "new.key"), "--registry", str(f)],
                                capsys)
            if code == 0:
                return  # a registry keygen could extend: the key and the registry are written, as asked
        assert snapshot(Path(tmp)) == before


# ---------------------------------------------------------------- federated messages
CONFIG_VALUE = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=16), st.binary(max_size=16), st.booleans(),
                         st.lists(st.integers(-5, 5), max_size=3), st.lists(st.text(max_size=4), max_size=3))


def _mutate_record(data, rec, keys: list[str]) -> None:
    """Replace, drop or add 1-3 entries of a flwr ConfigRecord."""
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["replace", "drop", "add"]))
        key = data.draw(st.sampled_from(keys)) if op != "add" else data.draw(st.text(min_size=1, max_size=8))
        if op == "drop":
            if key in rec:
                del rec[key]
        else:
            value = data.draw(st.one_of(CONFIG_VALUE, st.sampled_from(["{", "[1,", "NaN", "{}", "[]", "1|x"])))
            try:
                rec[key] = value
            except (TypeError, ValueError, IndexError):  # flwr itself refuses it: it never reaches the wire
                pass


@FUZZ
@given(data=st.data())
def test_fuzz_federated_reply(keys, data):
    import torch

    from patchlm.federated.flower.wire import Reply, read_reply, reply_content
    from patchlm.federated.signing import KeyPair, KeyRegistry, UpdateVerifier, sign_tensors, update_context

    kp = KeyPair.load(keys / "client-0.key")
    tensors = {"a.lora_A": torch.ones(2, 4), "a.lora_B": torch.zeros(4, 2)}
    sig, _ = sign_tensors(kp, tensors, update_context("run", 1, "client-0", 8, alpha=4.0))
    content = reply_content(Reply(client_id="client-0", run_id="run", round=1, num_samples=8, alpha=4.0,
                                  tensors=tensors, metrics={"train_loss": 0.5}, signature=sig, scheme="mldsa"))
    meta = content["meta"]
    _mutate_record(data, meta, list(meta.keys()))
    try:
        reply, _ = read_reply(content)
    except (KeyError, ValueError, TypeError):
        return  # the server's documented contract: counted as a malformed reply
    verifier = UpdateVerifier(KeyRegistry.load(keys / "registry.json"), "run")
    v = verifier.check(reply.tensors, reply.claimed(), reply.signature, 1)
    assert v.ok in (True, False)


@FUZZ
@given(data=st.data())
def test_fuzz_federated_broadcast(data):
    import torch

    from patchlm.federated.flower.wire import broadcast_config, broadcast_content, read_broadcast

    config = broadcast_config(2, json.dumps({"rounds": 3}), ["ab" * 8], signature=b"\x01" * 8, scheme="mldsa")
    content, _ = broadcast_content(config, [{"w": torch.ones(2)}], start=1)
    rec = content["config"]
    _mutate_record(data, rec, list(rec.keys()))
    try:
        read_broadcast(content)
    except (KeyError, ValueError, TypeError):
        pass
