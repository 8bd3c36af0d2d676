"""MoE upcycling (Mixtral with transformers 5's fused experts), mergekit-moe gate modes and YAML, router-only
training, Model-GLUE's model/block/FFN mixtures, and bad input: on tiny-random-llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, sample_ids

from patchlm.errors import BaseMismatchError, ConfigError
from patchlm.moe import Expert, MoeConfig, save_upcycled, upcycle
from patchlm.moe.mixtures import block_mixture, block_router_parameters, model_mixture
from patchlm.moe.router import gate_vectors
from patchlm.patch import Patch

TINY = "tiny-random-llama"
PROMPTS = [["Review: a fine film\nSentiment:", "Review: dull"], ["Question: who wrote it?"], ["News: markets rose"]]


def lora_patch(base, seed: int, task: str = "rotten_tomatoes", scale: float = 0.1) -> Patch:
    """A LoRA patch on every linear module with random A and B (as if trained), recording its task."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, m in base.model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            tensors[f"{n}.lora_A"] = torch.randn(2, m.in_features, generator=g) * scale
            tensors[f"{n}.lora_B"] = torch.randn(m.out_features, 2, generator=g) * scale
    return Patch(kind="lora", base=base.ref(), spec={"r": 2, "alpha": 4, "targets": sorted(
        {k.rsplit(".", 1)[0] for k in tensors})}, tensors=tensors, provenance={"task": task})


def logits(model, ids=None):
    ids = sample_ids() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def experts_of(src, n, prompts=True):
    return [Expert(source=src, positive_prompts=PROMPTS[i % 3] if prompts else None) for i in range(n)]


def test_expert_hits_count_the_experts_a_forward_reads(tiny):
    from patchlm.moe.upcycle import ExpertHits, param_counts

    up = upcycle(TINY, experts_of(TINY, 4), MoeConfig(gate_mode="random", top_k=1), base=tiny)
    c = up.model.config
    per_layer = 3 * c.hidden_size * c.intermediate_size
    with ExpertHits(up.model) as hits, torch.no_grad():
        up.model(input_ids=sample_ids()[:1, :1])  # one token: top_k = 1 expert per layer
        up.model(input_ids=sample_ids())           # 16 tokens
    assert not hits._handles and len(hits.calls) == 2 * c.num_hidden_layers
    assert hits.hit_fraction(tokens=1) == 0.25
    counts = param_counts(up.model)
    assert hits.touched_params(tokens=1) == counts["active_params"]  # one token reads exactly its top-k experts
    # by hand: total minus, per call, the experts that no token hit
    want = sum(counts["total_params"] - (n - h) * per_layer * c.num_hidden_layers for t, h, n in hits.calls
               if t == 16) / c.num_hidden_layers
    assert hits.touched_params(tokens=16) == round(want) and hits.hit_fraction(tokens=16) > 0.25
    assert hits.touched_params(tokens=3) is None


# ---------------------------------------------------------------- function preservation
@pytest.mark.parametrize("mode", ["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg"])
@pytest.mark.parametrize("k", [1, 2])
def test_identical_copies_give_the_base_logits_for_any_router(tiny, mode, k):
    up = upcycle(TINY, experts_of(TINY, 3), MoeConfig(gate_mode=mode, top_k=k), base=tiny)
    assert (logits(up.model) - logits(tiny.model)).abs().max() < 1e-5


def test_identical_patch_experts_give_the_patched_base(tiny, tmp_path):
    p = lora_patch(tiny, 1)
    p.save(tmp_path / "p")
    up = upcycle(TINY, [Expert(str(tmp_path / "p")), Expert(str(tmp_path / "p"))],
                 MoeConfig(gate_mode="random", shared="average"), base=tiny)
    want = logits(Patch.load(tmp_path / "p").apply(tiny))
    assert (logits(up.model) - want).abs().max() < 1e-5


def test_export_loads_in_plain_transformers_with_fused_keys_and_the_base_config(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    p = lora_patch(tiny, 2)
    p.save(tmp_path / "p")
    up = upcycle(TINY, [Expert(str(tmp_path / "p"), positive_prompts=PROMPTS[0]),
                        Expert(TINY, positive_prompts=PROMPTS[1])], MoeConfig(gate_mode="hidden", top_k=1), base=tiny)
    out = save_upcycled(up, tmp_path / "moe")
    loaded = MixtralForCausalLM.from_pretrained(out)
    assert (logits(loaded) - logits(up.model)).abs().max() < 1e-5
    sd = load_file(str(out / "model.safetensors"))
    c = tiny.model.config
    E, f, h = 2, c.intermediate_size, c.hidden_size
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * f, h)
    assert sd["model.layers.0.mlp.experts.down_proj"].shape == (E, h, f)
    assert sd["model.layers.0.mlp.gate.weight"].shape == (E, h)
    base_gate = tiny.model.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(sd["model.layers.0.mlp.experts.gate_up_proj"][1, :f], base_gate)  # gate rows first
    base_up = tiny.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(sd["model.layers.0.mlp.experts.gate_up_proj"][1, f:], base_up)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 2
    for key in ("rope_parameters", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[key] == getattr(c, key), key
    assert up.report["active_params"] < up.report["total_params"]


# ---------------------------------------------------------------- gate modes
def test_gate_modes_rows_have_the_definitions_shape_and_norm(tiny):
    c = tiny.model.config
    L, h = c.num_hidden_layers, c.hidden_size
    ex = experts_of(TINY, 3)
    for mode in ("hidden", "hidden_avg", "cheap_embed"):
        g = gate_vectors(mode, tiny.model, tiny.tokenizer, ex)
        assert g.shape == (L, 3, h)
        assert torch.allclose(g.norm(dim=-1), torch.ones(L, 3), atol=1e-5), mode
    ce = gate_vectors("cheap_embed", tiny.model, tiny.tokenizer, ex)
    assert torch.equal(ce[0], ce[-1])  # the same vector in every layer
    r = gate_vectors("random", tiny.model, tiny.tokenizer, ex, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)  # what mergekit-moe draws after --random-seed 3
    assert torch.equal(r, torch.randn((L, 3, h)))
    u = gate_vectors("uniform_random", tiny.model, tiny.tokenizer, ex, generator=torch.Generator().manual_seed(0))
    assert u.abs().max() <= 1 / math.sqrt(h) and u.abs().max() > 0.5 / math.sqrt(h)
    hid = gate_vectors("hidden", tiny.model, tiny.tokenizer, ex)
    neg = [Expert(TINY, positive_prompts=PROMPTS[0], negative_prompts=PROMPTS[1])]
    hn = gate_vectors("hidden", tiny.model, tiny.tokenizer, neg)
    assert not torch.allclose(hn[:, 0], hid[:, 0])


def test_hidden_gate_is_the_last_token_layer_input_by_hand(tiny):
    prompt = "Review: a fine film"
    g = gate_vectors("hidden", tiny.model, tiny.tokenizer, [Expert(TINY, positive_prompts=[prompt])])
    ids = tiny.tokenizer(tiny.tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(tiny.model.config.num_hidden_layers):
        v = hs[i][0, -1]
        assert torch.allclose(g[i, 0], v / v.norm(), atol=1e-5)


def test_prompts_default_to_the_specialists_training_task(tiny, tmp_path):
    lora_patch(tiny, 1, task="rotten_tomatoes").save(tmp_path / "a")
    lora_patch(tiny, 2, task="trec").save(tmp_path / "b")
    up = upcycle(TINY, [Expert(str(tmp_path / "a")), Expert(str(tmp_path / "b"))],
                 MoeConfig(gate_mode="hidden", prompts_per_task=3), base=tiny)
    assert [e["positive_prompts"] for e in up.report["experts"]] == [3, 3]
    assert up.report["expert_tasks"] == ["rotten_tomatoes", "trec"]


# ---------------------------------------------------------------- router training
def test_router_only_training_moves_only_the_routers(tiny):
    from patchlm.moe.train import train_routers

    ex = [Expert(TINY, task="rotten_tomatoes"), Expert(TINY, task="trec")]
    up = upcycle(TINY, ex, MoeConfig(gate_mode="uniform_random", top_k=1), base=tiny)
    before = {k: v.clone() for k, v in up.model.state_dict().items()}
    rep = train_routers(up.model, up.tokenizer, ["rotten_tomatoes", "trec"],
                        MoeConfig(router_steps=2, batch_size=2, max_length=32, router_lr=0.1))
    after = up.model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    assert rep["router_steps"] == 2 and math.isfinite(rep["loss_last"])


# ---------------------------------------------------------------- mergekit-moe YAML and the CLI
def test_mergekit_moe_yaml_equals_the_options(tiny, tmp_path, capsys):
    import yaml
    from safetensors.torch import load_file

    lora_patch(tiny, 1).save(tmp_path / "p")
    cfg = {"base_model": TINY, "gate_mode": "cheap_embed", "dtype": "float32", "experts_per_token": 1,
           "experts": [{"source_model": str(tmp_path / "p"), "positive_prompts": PROMPTS[0]},
                       {"source_model": TINY, "positive_prompts": PROMPTS[1], "negative_prompts": PROMPTS[2]}]}
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["moe", "upcycle", str(tmp_path / "moe.yml"), "--out", str(tmp_path / "a"), "--json"],
                             capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["gate_mode"] == "cheap_embed" and rep["top_k"] == 1
    want = upcycle(TINY, [Expert(str(tmp_path / "p"), positive_prompts=PROMPTS[0]),
                          Expert(TINY, positive_prompts=PROMPTS[1], negative_prompts=PROMPTS[2])],
                   MoeConfig(gate_mode="cheap_embed", top_k=1), base=tiny).model.state_dict()
    got = load_file(str(tmp_path / "a" / "model.safetensors"))
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-6), k


def test_cli_options_write_a_checkpoint(tmp_path, capsys):
    code, out, err = run_cli(["moe", "upcycle", "--base", TINY, "-m", TINY, "-m", TINY, "--gate-mode", "random",
                              "--top-k", "1", "--out", str(tmp_path / "m"), "--json"], capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "patchlm_moe.json").exists()
    assert json.loads(out)["top_k"] == 1


def _bad(capsys, tmp_path, args, *words):
    out = tmp_path / "out"
    code, _, err = run_cli(["moe", "upcycle", *args, "--out", str(out)], capsys)
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    return lines[0]


def test_bad_input_one_line_exit_2_nothing_written(tiny, tmp_path, capsys):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    base = ["--base", TINY]
    _bad(capsys, tmp_path, [*base, "-m", TINY, "-m", TINY, "--gate-mode", "sparse"], "unknown gate mode", "--gate-mode")
    _bad(capsys, tmp_path, [*base, "-m", TINY, "-m", TINY, "--gate-mode", "random", "--top-k", "3"],
         "top_k 3", "--top-k")
    _bad(capsys, tmp_path, [*base, "-m", "gemma3-270m", "--gate-mode", "random", "--top-k", "1"],
         "gemma3_text", "softcapping")
    _bad(capsys, tmp_path, ["--base", "gemma3-270m", "-m", TINY, "--gate-mode", "random", "--top-k", "1"],
         "gemma3_text")
    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=tiny.model.config.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
                     ).save_pretrained(other)
    line = _bad(capsys, tmp_path, [*base, "-m", str(other), "-m", TINY, "--gate-mode", "random"], "hidden_size")
    assert line.count("blake2b:") == 2  # both fingerprints named
    p = lora_patch(tiny, 1)
    p.base = {**p.base, "fingerprint": "blake2b:0123"}
    p.save(tmp_path / "alien")
    line = _bad(capsys, tmp_path, [*base, "-p", str(tmp_path / "alien"), "-m", TINY, "--gate-mode", "random"],
                "blake2b:0123", tiny.fingerprint)
    (tmp_path / "empty.yml").write_text(yaml.safe_dump({"base_model": TINY, "gate_mode": "hidden", "experts": [
        {"source_model": TINY, "positive_prompts": [""]}, {"source_model": TINY, "positive_prompts": ["x"]}]}))
    _bad(capsys, tmp_path, [str(tmp_path / "empty.yml")], "tokenizes to nothing")
    (tmp_path / "shared.yml").write_text(yaml.safe_dump({"base_model": TINY, "experts": [{"source_model": TINY}],
                                                         "shared_experts": [{"source_model": TINY}]}))
    _bad(capsys, tmp_path, [str(tmp_path / "shared.yml")], "shared_experts")
    _bad(capsys, tmp_path, [*base, "-m", TINY, "-m", TINY, "--gate-mode", "hidden"], "no positive prompts")


def test_library_errors_name_fields(tiny):
    with pytest.raises(ConfigError) as e:
        upcycle(TINY, experts_of(TINY, 2), MoeConfig(top_k=3), base=tiny)
    assert e.value.field == "top_k"
    p = lora_patch(tiny, 1)
    p.base = {**p.base, "fingerprint": "blake2b:ff"}
    with pytest.raises(BaseMismatchError):
        upcycle(TINY, [Expert("x", patch=p), Expert(TINY)], MoeConfig(gate_mode="random"), base=tiny)


# ---------------------------------------------------------------- Model-GLUE mixtures
def test_mixtures_of_identical_families_give_the_base_logits(tiny):
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    ids = sample_ids()
    with torch.no_grad():
        want = tiny.model(input_ids=ids, attention_mask=mask).logits
    m = model_mixture(tiny, [TINY] * 3, PROMPTS, 2, 64)
    b = block_mixture(tiny, [TINY] * 3, PROMPTS, 64)
    for mix in (m, b):
        with torch.no_grad():
            got = mix(input_ids=ids, attention_mask=mask).logits
        assert (got - want).abs().max() < 1e-5


def test_mixture_routers_get_gradients_straight_through(tiny):
    # two different families: with identical ones the output does not depend on the gates (zero gradient)
    fams = [lora_patch(tiny, s, scale=0.3) for s in (1, 2)]
    b = block_mixture(tiny, fams, PROMPTS[:2], 64)
    ps = block_router_parameters(b)
    for p in ps:
        p.requires_grad_(True)
    b.train()
    b(input_ids=sample_ids()).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)


def test_model_mixture_routes_each_family_its_own_prompts(tiny, tmp_path):
    fams = [lora_patch(tiny, s, scale=0.3) for s in (1, 2)]
    m = model_mixture(tiny, fams, [PROMPTS[0] * 2, PROMPTS[2] * 2], 2, 64)
    for k, prompts in enumerate([PROMPTS[0], PROMPTS[2]]):
        ids = tiny.tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert int(m.route(ids)[0]) == k


def test_glue_mix_ffn_writes_a_mixtral_and_says_why(tiny, tmp_path, capsys):
    lora_patch(tiny, 1, task="rotten_tomatoes").save(tmp_path / "a")
    lora_patch(tiny, 2, task="trec").save(tmp_path / "b")
    code, out, err = run_cli(["glue", "-p", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "-t", "rotten_tomatoes",
                              "--heuristic", "average", "--limit", "4", "--threshold", "1.0", "--mix", "ffn",
                              "--out", str(tmp_path / "mix"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)["mix"]
    assert rep["level"] == "ffn" and rep["families"] == 2 and "why" in rep and len(rep["merged"]) == 2
    assert json.loads((Path(tmp_path / "mix") / "config.json").read_text())["num_local_experts"] == 2
    code, _, err = run_cli(["glue", "-p", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "-t", "rotten_tomatoes",
                            "--heuristic", "average", "--limit", "4", "--threshold", "0.0", "--mix", "ffn"], capsys)
    assert code == 2 and "two families" in err  # threshold 0: every member joins the first family
    code, _, err = run_cli(["glue", "-p", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "-t", "rotten_tomatoes",
                            "--mix", "layer"], capsys)
    assert code == 2 and "unknown mix" in err and "--mix" in err


# ---------------------------------------------------------------- parity with mergekit-moe (its own venv)
def _mergekit_python() -> str | None:
    import subprocess

    py = Path(__file__).resolve().parents[1] / "bench" / ".cache" / "mergekit-venv" / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import mergekit.scripts.moe"], capture_output=True
                                      ).returncode == 0:
        return str(py)
    return None


MK_DRIVER = """
import json, sys, yaml
from mergekit.merge import MergeOptions
from mergekit.moe.config import MoEMergeConfig
from mergekit.scripts.moe import build
for cfg_path, out, seed in json.loads(sys.argv[1]):
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed, device="cpu")
    opts.apply_global_options()
    build(MoEMergeConfig.model_validate(yaml.safe_load(open(cfg_path))), out, opts, device="cpu")
"""


@pytest.mark.skipif(_mergekit_python() is None, reason="mergekit-moe not installed in bench/.cache/mergekit-venv "
                    "(`make mergekit-venv` builds it)")
def test_same_yaml_same_tensors_as_mergekit_moe(tiny, tmp_path):
    import os
    import shutil
    import subprocess

    import yaml
    from safetensors.torch import load_file, save_file

    src = Path(tiny.path)
    zoo = []
    for i in range(2):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        sd = load_file(str(d / "model.safetensors"))
        g = torch.Generator().manual_seed(i + 1)
        save_file({k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in sd.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        zoo.append(str(d))
    jobs = []
    for mode in ("cheap_embed", "random", "uniform_random", "hidden"):
        cfg = {"base_model": str(src), "gate_mode": mode, "dtype": "float32", "experts_per_token": 1,
               "experts": [{"source_model": zoo[0], "positive_prompts": PROMPTS[0]},
                           {"source_model": zoo[1], "positive_prompts": PROMPTS[1], "negative_prompts": PROMPTS[2]}]}
        f = tmp_path / f"{mode}.yml"
        f.write_text(yaml.safe_dump(cfg))
        jobs.append((str(f), str(tmp_path / f"mk-{mode}"), 7))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([_mergekit_python(), "-c", MK_DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for cfg_path, mk_out, seed in jobs:
        mode = Path(cfg_path).stem
        from patchlm.moe.recipe import load_moe_recipe

        b, ex, fields = load_moe_recipe(cfg_path)
        got = upcycle(b, ex, MoeConfig(**fields, seed=seed)).model.state_dict()
        want = {}
        for f in Path(mk_out).glob("*.safetensors"):
            want.update(load_file(str(f)))
        assert set(want) <= set(got), (mode, sorted(set(want) - set(got))[:3])
        tol = 2e-2 if mode == "hidden" else 1e-5  # mergekit-moe runs `hidden` in bf16
        for k, v in want.items():
            assert torch.allclose(got[k].float(), v.float(), atol=tol), (mode, k, float((got[k] - v).abs().max()))
