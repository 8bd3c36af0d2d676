"""MC-SMoE on a tiny upcycled MoE (tiny-random-llama + random LoRA specialists): routing statistics, alignment,
grouping, usage-weighted merging that rebuilds a smaller expert set, low-rank + sparse, recovery, baselines, the
CLI and its bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, sample_ids

from patchlm.errors import ConfigError
from patchlm.moe import Expert, MoeConfig, save_upcycled, upcycle
from patchlm.moe.config import CompressConfig
from patchlm.moe.losparse import LowRankSparse, bake, check_growth, cubic_sparsity, factorize
from patchlm.moe.mcsmoe import (
    Plan,
    RoutingStats,
    align_permutation,
    calibration_batches,
    compress,
    distill_loss,
    expert_weights,
    group_counts,
    group_layer,
    merge_experts,
    moe_layers,
    permute_expert,
    plan_merge,
    rebuild,
    routing_stats,
)
from patchlm.patch import Patch

TINY = "tiny-random-llama"
TASKS = ["rotten_tomatoes", "trec"]
SMALL = {"calib_examples": 8, "batch_size": 4, "max_length": 32}


def lora_patch(base, seed: int, task: str) -> Patch:
    """A LoRA patch on every MLP linear with random A and B (as if trained), recording its task."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, m in base.model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".mlp." in n:
            tensors[f"{n}.lora_A"] = torch.randn(2, m.in_features, generator=g) * 0.3
            tensors[f"{n}.lora_B"] = torch.randn(m.out_features, 2, generator=g) * 0.3
    return Patch(kind="lora", base=base.ref(), spec={"r": 2, "alpha": 4, "targets": sorted(
        {k.rsplit(".", 1)[0] for k in tensors})}, tensors=tensors, provenance={"task": task})


@pytest.fixture()
def moe(tiny, tmp_path):
    """A 4-expert top-2 MoE of distinct specialists (random routers), in memory and saved."""
    ex = []
    for i in range(4):
        lora_patch(tiny, i + 1, TASKS[i % 2]).save(tmp_path / f"p{i}")
        ex.append(Expert(str(tmp_path / f"p{i}")))
    up = upcycle(TINY, ex, MoeConfig(gate_mode="uniform_random", top_k=2, seed=3), base=tiny)
    save_upcycled(up, tmp_path / "moe")
    return up


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=sample_ids() if ids is None else ids).logits.float()


def cfg(**kw) -> CompressConfig:
    return CompressConfig(**{**SMALL, **kw})


# ---------------------------------------------------------------- 1. routing statistics
def test_routing_stats_count_top_k_of_non_padding_tokens_by_hand(moe):
    batches = calibration_batches(moe.tokenizer, TASKS, cfg())
    st = routing_stats(moe.model, batches)
    L, E, k = 4, 4, 2
    assert st.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert torch.allclose(st.counts.sum(1), torch.full((L,), float(st.tokens * k), dtype=torch.float64))
    assert torch.allclose(st.usage.sum(1), torch.ones(L, dtype=torch.float64))
    want = torch.zeros(L, E, dtype=torch.float64)
    gram = torch.zeros(L, E, E, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            out = moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
            keep = b["attention_mask"].reshape(-1).bool()
            for i, lg in enumerate(out.router_logits):
                lg = lg.double()[keep]
                want[i] += torch.bincount(lg.topk(k, -1).indices.reshape(-1), minlength=E).double()
                gram[i] += lg.T @ lg
    assert torch.equal(st.counts, want) and torch.allclose(st.gram, gram)
    sim = st.logit_similarity
    assert torch.allclose(sim.diagonal(dim1=1, dim2=2), torch.ones(L, E, dtype=torch.float64))
    with torch.no_grad():
        col = torch.cat([moe.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   output_router_logits=True
                                   ).router_logits[0].double()[b["attention_mask"].reshape(-1).bool()]
                         for b in batches])
    assert math.isclose(float(sim[0, 0, 1]), float(torch.nn.functional.cosine_similarity(col[:, 0], col[:, 1], 0)),
                        rel_tol=1e-6)


# ---------------------------------------------------------------- 2. permutation alignment
def test_alignment_is_function_preserving_and_recovers_a_known_permutation(moe):
    want = logits(moe.model)
    blocks = moe_layers(moe.model)
    for b in blocks:
        ref = expert_weights(b, 0)
        for e in range(1, 4):
            perm = align_permutation(ref, expert_weights(b, e))
            assert sorted(perm.tolist()) == list(range(perm.numel())) and not torch.equal(perm, torch.arange(128))
            gu, d = permute_expert(*expert_weights(b, e), perm)
            with torch.no_grad():
                b.experts.gate_up_proj[e] = gu
                b.experts.down_proj[e] = d
    assert (logits(moe.model) - want).abs().max() < 1e-5
    gu, d = expert_weights(blocks[0], 1)
    shuffle = torch.randperm(d.shape[1], generator=torch.Generator().manual_seed(0))
    mixed = permute_expert(gu, d, shuffle)
    back = permute_expert(*mixed, align_permutation((gu, d), mixed))
    assert torch.equal(back[0], gu) and torch.equal(back[1], d)


# ---------------------------------------------------------------- 3. grouping
def test_grouping_by_hand():
    sim = torch.tensor([[1, .1, .9, .2], [.1, 1, .3, .8], [.9, .3, 1, .1], [.2, .8, .1, 1]])
    assert group_layer([.4, .3, .2, .1], 2, lambda e, d: float(sim[e, d])) == [[0, 2], [1, 3]]
    assert group_layer([.1, .2, .3, .4], 1, lambda e, d: 0.0) == [[3, 2, 1, 0]]
    assert group_layer([.25] * 4, 4, lambda e, d: 0.0) == [[0], [1], [2], [3]]
    usage = torch.tensor([[.7, .1, .1, .1], [.3, .3, .2, .2], [.26, .25, .25, .24]])
    assert group_counts(usage, 2, adaptive=False) == [2, 2, 2]
    # global threshold: every layer its top expert, then the 3 globally most used others (.3, .25, .25)
    assert group_counts(usage, 2, adaptive=True) == [1, 2, 3]


def test_unused_expert_refused_or_dropped_with_weight_zero(moe):
    counts = torch.tensor([[10., 5., 5., 0.]] * 4, dtype=torch.float64)
    st = RoutingStats(counts=counts, gram=torch.eye(4, dtype=torch.float64).repeat(4, 1, 1), tokens=10, top_k=2)
    with pytest.raises(ConfigError) as e:
        plan_merge(moe.model, st, cfg(groups=2))
    assert e.value.field == "allow_unused" and "expert 3 of layer 0" in str(e.value)
    plan = plan_merge(moe.model, st, cfg(groups=2, allow_unused=True))
    assert all(3 in [e for grp in g for e in grp] and 3 not in [x[0] for x in g] for g in plan.groups)
    assert plan.weights[0][3] == 0 and plan.notes


# ---------------------------------------------------------------- 4. merging that rebuilds the expert set
def test_merge_weights_by_hand():
    a = (torch.ones(4, 3), torch.ones(3, 2))
    b = (torch.zeros(4, 3), 3 * torch.ones(3, 2))
    gu, d = merge_experts([a, b], [0.3, 0.1])
    assert torch.allclose(gu, torch.full((4, 3), 0.75)) and torch.allclose(d, torch.full((3, 2), 1.5))
    gu, d = merge_experts([a, b], [0, 0])  # no usage at all: the plain average
    assert torch.allclose(gu, torch.full((4, 3), 0.5))


def test_rebuild_with_one_expert_per_group_is_the_same_model(moe):
    plan = Plan(groups=[[[e] for e in (2, 0, 3, 1)]] * 4, weights=[[1.0] * 4] * 4)
    new = rebuild(moe.model, plan, cfg(groups=4))
    assert (logits(new) - logits(moe.model)).abs().max() < 1e-5


def test_identical_experts_merge_into_one_without_changing_the_model(tiny):
    up = upcycle(TINY, [Expert(TINY)] * 4, MoeConfig(gate_mode="uniform_random", top_k=2), base=tiny)
    r = compress(up.model, up.tokenizer, TASKS, cfg(groups=1))
    assert r.model.config.num_local_experts == 1 and r.model.config.num_experts_per_tok == 1
    assert (logits(r.model) - logits(tiny.model)).abs().max() < 1e-5
    # copies of one expert are aligned already: the weight matching moves no neuron
    assert r.report["alignment"]["moved"] == 0 and r.report["alignment"]["neurons"] > 0


def test_rebuild_reports_how_many_neurons_the_alignment_moved(moe):
    plan = Plan(groups=[[[0, 1, 2, 3]]] * 4, weights=[[1.0] * 4] * 4)
    a: dict = {}
    rebuild(moe.model, plan, cfg(groups=1), alignment=a)
    f = moe_layers(moe.model)[0].experts.down_proj.shape[-1]
    assert a["neurons"] == 4 * 3 * f and 0 < a["moved"] <= a["neurons"]  # distinct specialists get permuted


def test_merged_checkpoint_is_smaller_and_loads_in_plain_transformers(moe, tmp_path):
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    from patchlm.moe.mcsmoe import save_compressed

    r = compress(moe.model, moe.tokenizer, TASKS, cfg(groups=2))
    out = save_compressed(r, moe.tokenizer, tmp_path / "small")
    big = (tmp_path / "moe" / "model.safetensors").stat().st_size
    small = (out / "model.safetensors").stat().st_size
    assert small < big
    loaded = MixtralForCausalLM.from_pretrained(out)
    assert loaded.config.num_local_experts == 2
    assert (logits(loaded) - logits(r.model)).abs().max() < 1e-5
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 2 and sd["model.layers.0.mlp.gate.weight"
                                                                              ].shape[0] == 2
    assert r.report["expert_params"] * 2 == r.report["expert_params_before"]
    assert json.loads((out / "patchlm_mcsmoe.json").read_text())["plan"]["counts"] == [2, 2, 2, 2]


def test_baselines_take_the_same_path_and_differ(moe):
    def experts(**kw):
        r = compress(moe.model, moe.tokenizer, TASKS, cfg(groups=2, **kw))
        return r, moe_layers(r.model)[0].experts.gate_up_proj.detach()

    _, a = experts()
    _, b = experts(merge_weights="uniform")
    _, c = experts(align=False)
    prune, d = experts(method="prune")
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    g = prune.report["plan"]["groups"][0]
    assert torch.equal(d[0], moe_layers(moe.model)[0].experts.gate_up_proj[g[0][0]])  # the dominant, untouched
    _, w = experts(router_rows="weighted")
    assert torch.equal(w, a)
    ad = compress(moe.model, moe.tokenizer, TASKS, cfg(groups=2, layer_groups="adaptive"))
    counts = ad.report["plan"]["counts"]
    assert sum(counts) == 8 and ad.model.config.num_local_experts == max(counts)
    only = compress(moe.model, moe.tokenizer, TASKS, cfg(low_rank=2, sparsity=0.5))  # compression alone
    assert only.report["experts_after"] == 4 and only.report["expert_params"] < only.report["expert_params_before"]


# ---------------------------------------------------------------- 5. low rank + sparse, recovery
def test_low_rank_plus_sparse_is_exact_before_pruning_and_prunes_by_importance():
    W = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    p = LowRankSparse(W, chunks=2, rank=2, beta=0.5)
    assert torch.allclose(p.dense(), W, atol=1e-5) and p.U.shape == (2, 3, 4, 2) and p.V.shape == (2, 3, 2, 5)
    p.importance.copy_(torch.arange(p.S.numel(), dtype=torch.float32).reshape(p.S.shape))
    p.prune(0.75)
    assert int(p.mask.sum()) == 2 * 3 * 5 and bool(p.mask[..., -1, :].all()) and not bool(p.mask[..., 0, :].any())
    assert p.params() == p.U.numel() + p.V.numel() + 30
    assert cubic_sparsity(0, 10, 0.8, 0.5) == 0 and cubic_sparsity(5, 10, 0.8, 0.5) == 0.8
    assert math.isclose(cubic_sparsity(2, 10, 0.8, 0.5), 0.8 * (1 - 0.6 ** 3))
    with pytest.raises(ConfigError) as e:
        check_growth(64, 128, 40, 0.1)
    assert e.value.field == "sparsity"


def test_factorize_then_bake_keeps_the_model(moe):
    want = logits(moe.model)
    factorize(moe.model, 2, 0.85)
    assert (logits(moe.model) - want).abs().max() < 1e-5
    bake(moe.model)
    assert "parametrizations" not in dict(moe.model.named_modules())["model.layers.0.mlp.experts"]._modules
    assert (logits(moe.model) - want).abs().max() < 1e-5


def test_distill_loss_is_ce_when_teacher_is_student(moe):
    from patchlm.train.engine import causal_lm_loss

    b = calibration_batches(moe.tokenizer, TASKS, cfg())[0]
    with torch.no_grad():
        got, n = distill_loss(moe.model, 0.2, 2.0)(moe.model, b)
        ce, m = causal_lm_loss(moe.model, b)
    assert n == m and math.isclose(float(got), float(ce), rel_tol=1e-5)


def test_mc_smoe_with_recovery_trains_routers_and_compressed_experts(moe):
    before = {k: v.clone() for k, v in moe.model.state_dict().items()}
    r = compress(moe.model, moe.tokenizer, TASKS, cfg(groups=2, low_rank=2, sparsity=0.5, recover=2, lr=1e-2))
    assert all(torch.equal(v, before[k]) for k, v in moe.model.state_dict().items())  # the teacher is untouched
    rec = r.report["recovery"]
    assert rec["steps"] == 2 and math.isfinite(rec["loss_last"])
    assert r.report["expert_params"] < r.report["expert_params_merged"] < r.report["expert_params_before"]
    assert r.report["expert_memory_reduction"] > 0.6
    one = compress(moe.model, moe.tokenizer, TASKS, cfg(groups=2, low_rank=2, sparsity=0.5))
    assert not torch.equal(moe_layers(one.model)[0].gate.weight, moe_layers(r.model)[0].gate.weight)


# ---------------------------------------------------------------- the CLI and bad input
def test_cli_compress_writes_a_smaller_checkpoint(moe, tmp_path, capsys):
    code, out, err = run_cli(["moe", "compress", str(tmp_path / "moe"), "--task", "rotten_tomatoes", "--keep", "0.5",
                              "--low-rank", "2", "--sparsity", "0.5", "--recover", "1", "--calib-examples", "4",
                              "--batch-size", "2", "--max-length", "32", "--out", str(tmp_path / "s"), "--json"],
                             capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["experts_after"] == 2 and rep["checkpoint_bytes"] < (tmp_path / "moe" / "model.safetensors"
                                                                     ).stat().st_size
    assert (tmp_path / "s" / "config.json").exists() and (tmp_path / "s" / "patchlm_mcsmoe.json").exists()


def _bad(capsys, tmp_path, args, *words):
    out = tmp_path / "out"
    code, _, err = run_cli(["moe", "compress", *args, "--calib-examples", "4", "--max-length", "32",
                            "--out", str(out)], capsys)
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    return lines[0]


def test_bad_input_one_line_exit_2_nothing_written(moe, tiny, tmp_path, capsys, monkeypatch):
    import patchlm.moe.mcsmoe as mc

    m, t = [str(tmp_path / "moe")], ["--task", "rotten_tomatoes"]
    _bad(capsys, tmp_path, [str(tiny.path), *t, "--groups", "2"], "has no experts", "LlamaForCausalLM")
    _bad(capsys, tmp_path, [*m, *t, "--groups", "5"], "groups 5", "4 experts", "--groups")
    _bad(capsys, tmp_path, [*m, *t, "--groups", "0"], "groups must be at least 1", "--groups")
    _bad(capsys, tmp_path, [*m, *t, "--keep", "1.5"], "keep", "--keep")
    _bad(capsys, tmp_path, [*m, *t, "--keep", "0.5", "--groups", "2"], "not both")
    _bad(capsys, tmp_path, [*m, *t, "--groups", "2", "--low-rank", "40", "--sparsity", "0.1"], "not fewer",
         "--sparsity")
    _bad(capsys, tmp_path, [*m, *t, "--groups", "2", "--low-rank", "2"], "sparsity 0", "--sparsity")
    _bad(capsys, tmp_path, [*m, *t, "--groups", "2", "--low-rank", "64", "--sparsity", "0.9"], "smaller side",
         "--low-rank")
    _bad(capsys, tmp_path, [*m, "--task", "no_such_task", "--groups", "2"], "no_such_task")
    real = mc.routing_stats

    def starved(model, batches):
        st = real(model, batches)
        st.counts[1, 2] = 0
        return st

    monkeypatch.setattr(mc, "routing_stats", starved)
    _bad(capsys, tmp_path, [*m, *t, "--groups", "2"], "expert 2 of layer 1", "--allow-unused")
