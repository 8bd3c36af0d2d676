"""Streamed checkpoint merges: equal to the in-memory merge, loadable by transformers, bad inputs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from patchlm.errors import BaseMismatchError, ConfigError, OutputExistsError
from patchlm.merge.plan import plan_from_config
from patchlm.merge.stream import merge_checkpoints, merge_state_dicts
from patchlm.models.checkpoint import Checkpoint


def _variant(src: Path, dest: Path, seed: int, scale: float = 0.01, transform=None) -> Path:
    """A 'fine-tuned' copy of a checkpoint: small seeded changes to every float tensor."""
    shutil.copytree(src, dest)
    (dest / "patchlm.json").unlink(missing_ok=True)
    f = dest / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + torch.randn(v.shape, generator=g) * scale) for k, v in sd.items()}
    if transform:
        sd = transform(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from patchlm.models import load_base

    base = load_base("tiny-random-llama")
    root = tmp_path_factory.mktemp("zoo")
    b = Path(base.path)
    return {"base": str(b), "a": str(_variant(b, root / "a", 1)), "b": str(_variant(b, root / "b", 2)),
            "c": str(_variant(b, root / "c", 3)), "root": root}


def _states(zoo, names):
    return {zoo[n]: load_file(str(Path(zoo[n]) / "model.safetensors")) for n in names}


CONFIGS = {
    "ties": {"merge_method": "ties", "parameters": {"normalize": True},
             "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.4}},
                        {"model": "b", "parameters": {"weight": 0.3, "density": 0.6}},
                        {"model": "c", "parameters": {"weight": 0.2, "density": 0.5}}]},
    "dare_ties": {"merge_method": "dare_ties", "seed": 3,
                  "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                             {"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": [0.5, 1.0]},
                        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b",
                                   "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 1.0}]}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                              {"model": "c", "parameters": {"weight": 1.0}}]},
    "linear": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                    {"model": "b", "parameters": {"weight": 2.0}}], "no_base": True},
    "slerp": {"merge_method": "slerp", "parameters": {"t": [0.0, 0.5, 1.0]}, "models": [{"model": "a"}]},
}


def _cfg(zoo, name):
    c = json.loads(json.dumps(CONFIGS[name]))
    for m in c["models"]:
        m["model"] = zoo[m["model"]]
    if not c.pop("no_base", False):
        c["base_model"] = zoo["base"]
    return c


@pytest.mark.parametrize("method", list(CONFIGS))
def test_streamed_equals_in_memory(zoo, tmp_path, method):
    plan = plan_from_config(_cfg(zoo, method))
    out = tmp_path / "merged"
    report = merge_checkpoints(plan, out, shard_bytes=200_000)  # several shards
    assert report["shards"] > 1 and (out / "model.safetensors.index.json").exists()
    refs = [e.model for e in plan.models] + ([plan.base_model] if plan.base_model else [])
    configs = {r: json.loads((Path(r) / "config.json").read_text()) for r in refs}
    mem = merge_state_dicts(plan, _states_by_ref(refs), configs)
    streamed = Checkpoint(str(out))
    assert set(streamed.names) == set(mem)
    for name, t in mem.items():
        assert torch.equal(streamed.read(name), t), name


def _states_by_ref(refs):
    return {r: load_file(str(Path(r) / "model.safetensors")) for r in set(refs)}


def test_task_arithmetic_of_one_model_is_that_model(zoo, tmp_path):
    plan = plan_from_config({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                             "models": [{"model": zoo["a"], "parameters": {"weight": 1.0}}]})
    merge_checkpoints(plan, tmp_path / "m")
    a = load_file(str(Path(zoo["a"]) / "model.safetensors"))
    m = Checkpoint(str(tmp_path / "m"))
    for k, v in a.items():
        assert torch.allclose(m.read(k), v, atol=1e-6)


def test_output_is_a_standard_checkpoint(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = plan_from_config(_cfg(zoo, "ties"))
    out = tmp_path / "m"
    merge_checkpoints(plan, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    sd = model.state_dict()
    ref = Checkpoint(str(out))
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], ref.read("model.layers.0.mlp.up_proj.weight"))
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert (out / "merge_config.yml").exists()


def test_bad_checkpoints_are_refused_and_nothing_is_written(zoo, tmp_path):
    def widen(sd):
        k = "model.layers.0.mlp.up_proj.weight"
        sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
        return sd

    def drop(sd):
        sd.pop("model.layers.1.self_attn.q_proj.weight")
        return sd

    wide = _variant(Path(zoo["base"]), tmp_path / "wide", 5, transform=widen)
    missing = _variant(Path(zoo["base"]), tmp_path / "missing", 6, transform=drop)
    for bad, match in ((wide, "shape"), (missing, "missing tensor model.layers.1.self_attn.q_proj.weight")):
        plan = plan_from_config({"merge_method": "ties", "base_model": zoo["base"],
                                 "models": [{"model": zoo["a"]}, {"model": str(bad)}]})
        with pytest.raises(BaseMismatchError, match=match):
            merge_checkpoints(plan, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    plan = plan_from_config(_cfg(zoo, "ties"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        merge_checkpoints(plan, tmp_path / "exists")
    # a base missing a tensor
    plan = plan_from_config({"merge_method": "ties", "base_model": str(missing), "models": [{"model": zoo["a"]}]})
    with pytest.raises(BaseMismatchError, match="missing tensor"):
        merge_checkpoints(plan, tmp_path / "out2")


def test_slice_layer_range_checked(zoo, tmp_path):
    plan = plan_from_config({"merge_method": "slerp", "base_model": zoo["base"], "parameters": {"t": 0.5},
                             "slices": [{"sources": [{"model": zoo["base"], "layer_range": [0, 3]},
                                                     {"model": zoo["a"], "layer_range": [0, 3]}]}]})
    with pytest.raises(ConfigError, match="layer_range"):
        merge_checkpoints(plan, tmp_path / "o")


def test_cli_yaml_and_options(zoo, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "ties.yml"
    cfg.write_text(yaml.safe_dump(_cfg(zoo, "ties")))
    code, out, err = run_cli(["merge", str(cfg), "--out", str(tmp_path / "y"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["merge_method"] == "ties"
    c = _cfg(zoo, "ties")
    args = ["merge", "--base", zoo["base"], "--method", "ties", "--out", str(tmp_path / "o"), "--json",
            "--param", "normalize=true"]
    for m in c["models"]:
        args += ["-m", m["model"], "-w", str(m["parameters"]["weight"]), "-d", str(m["parameters"]["density"])]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    a, b = Checkpoint(str(tmp_path / "y")), Checkpoint(str(tmp_path / "o"))
    for n in a.names:
        assert torch.equal(a.read(n), b.read(n))
    code, out, err = run_cli(["merge", str(cfg), "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "already exists" in err
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**_cfg(zoo, "ties"), "merge_method": "model_stock"}))
    code, out, err = run_cli(["merge", str(bad), "--out", str(tmp_path / "z")], capsys)
    assert code == 2 and "model_stock" in err and not (tmp_path / "z").exists()


def test_dtype_and_tokenizer_source(zoo, tmp_path):
    cfg = {**_cfg(zoo, "ties"), "dtype": "bfloat16", "out_dtype": "float16", "tokenizer_source": zoo["a"]}
    plan = plan_from_config(cfg)
    merge_checkpoints(plan, tmp_path / "m")
    ck = Checkpoint(str(tmp_path / "m"))
    t = ck.read("model.layers.0.mlp.up_proj.weight")
    assert t.dtype == torch.float16
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (Path(zoo["a"]) / "tokenizer.json").read_bytes()
    # inputs rounded to bf16 before merging: same as merging bf16 copies in memory
    refs = [e.model for e in plan.models]
    states = {r: {k: v.to(torch.bfloat16) for k, v in s.items()} for r, s in _states_by_ref(refs).items()}
    configs = {r: json.loads((Path(r) / "config.json").read_text()) for r in refs}
    mem = merge_state_dicts(plan, states, configs)
    assert torch.equal(mem["model.layers.0.mlp.up_proj.weight"], t)


def test_checkpoint_positioned_reads_equal_safetensors(tmp_path):
    from patchlm.errors import PatchFormatError

    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 5, generator=g), "b": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16),
               "c": torch.tensor(2.5), "d": torch.arange(10, dtype=torch.int64), "e": torch.zeros(0, 3)}
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ck = Checkpoint(str(d))
    ref = load_file(str(d / "model.safetensors"))
    for name, t in ref.items():
        got = ck.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
        chunks = list(ck.read_chunks(name, max_elements=12))
        assert torch.equal(torch.cat([c.reshape(-1) for c in chunks]), t.reshape(-1)), name
    assert len(list(ck.read_chunks("a", max_elements=12))) == 19  # 2 rows of 5 per block
    got = ck.read("a")
    got += 1  # reads are fresh buffers the caller may change
    assert torch.equal(ck.read("a"), ref["a"])
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-8])  # cut the last tensor short
    with pytest.raises(PatchFormatError, match="truncated"):
        ck.read(max((n for n in ref if ck._where[n][1]), key=lambda n: sum(ck._where[n])))
