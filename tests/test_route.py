"""Routing over a patch library: library I/O and checks, the routed model (dispatch, top-k, skipped experts),
Phatgoose gates, GLIDER's global router, Arrow through PEFT, evaluation, and the `patchlm route` CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import sample_ids

from patchlm.data.task import Task
from patchlm.errors import BaseMismatchError, ConfigError
from patchlm.patch import Patch
from patchlm.route import Library, RouteConfig
from patchlm.route import routed as rt

WORDS = {"alpha": ["apple", "banana", "cherry", "grape", "melon", "peach"],
         "beta": ["engine", "piston", "gearbox", "axle", "clutch", "brake"]}


def make_task(name: str) -> Task:
    """A toy classification task whose inputs are about fruit (alpha) or car parts (beta)."""
    w = WORDS[name]
    ex = [{"text": f"the {w[i % 6]} and the {w[(i * 5 + 1) % 6]} number {i}", "label": i % 2} for i in range(40)]
    return Task(name=name, kind="classification", train=ex[:24], validation=ex[24:32], test=ex[32:],
                labels=["no", "yes"], verbalizers=[" negative", " positive"],
                template="Text: {text}\nAnswer:" if name == "alpha" else "Parts: {text}\nVerdict:")


def make_patch(base, seed: int, r: int = 4, targets: str = "qv") -> Patch:
    """A LoRA patch of base with random non-zero factors (so each expert changes the output)."""
    from patchlm.adapters.lora import LoraKind

    kind = LoraKind()
    spec = kind.attach(base.model, {"r": r, "alpha": 2 * r, "targets": targets}, None, seed=seed)
    tensors = kind.state(base.model)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.3 if k.endswith("lora_B") else v) for k, v in tensors.items()}
    kind.detach(base.model)
    return Patch(kind="lora", base=base.ref(), spec=spec, tensors=tensors)


@pytest.fixture()
def lib(tiny, tmp_path):
    """A library of two experts (alpha, beta) of tiny-random-llama with descriptions, examples and tasks."""
    lib = Library.open_or_create(tmp_path / "lib")
    for i, name in enumerate(("alpha", "beta")):
        p = make_patch(tiny, seed=i + 1).save(tmp_path / f"p-{name}")
        t = make_task(name)
        lib.add(p, description=f"questions about {'fruit' if name == 'alpha' else 'car parts'}",
                examples=[t.prompt(e) for e in t.train[:4]], name=name, task=name)
    return lib


# ---------------------------------------------------------------- library
def test_library_add_list_reopen(lib, tmp_path):
    again = Library.open(lib.path)
    assert again.names == ["alpha", "beta"]
    assert [r["examples"] for r in again.rows()] == [4, 4]
    assert again.library_id == lib.library_id
    assert again.patch("alpha").kind == "lora"


def test_library_refuses_another_base_naming_fingerprints(lib, tiny, tmp_path):
    p = make_patch(tiny, seed=9)
    p.base = {**p.base, "fingerprint": "blake2b:0000other"}
    p.save(tmp_path / "other")
    with pytest.raises(BaseMismatchError) as e:
        lib.add(tmp_path / "other", description="x", name="other")
    assert "blake2b:0000other" in str(e.value) and lib.base["fingerprint"] in str(e.value)
    assert Library.open(lib.path).names == ["alpha", "beta"]  # nothing half-added


def test_library_refuses_duplicate_name_and_missing_description(lib, tiny, tmp_path):
    p = make_patch(tiny, seed=3).save(tmp_path / "p3")
    with pytest.raises(ConfigError, match="already has an expert 'alpha'"):
        lib.add(p, description="d", name="alpha")
    with pytest.raises(ConfigError, match="task description"):
        lib.add(p, description="  ", name="gamma")


def test_empty_library_and_k_too_large(tiny, lib, tmp_path):
    from patchlm.route.evaluate import evaluate_router

    empty = Library.open_or_create(tmp_path / "empty")
    with pytest.raises(ConfigError, match="has no experts"):
        evaluate_router(tiny, empty, {"alpha": make_task("alpha")}, RouteConfig(router="uniform"))
    with pytest.raises(ConfigError, match="top_k 3 is larger than the library's 2 experts"):
        evaluate_router(tiny, lib, {"alpha": make_task("alpha")}, RouteConfig(router="uniform", top_k=3))


def test_glider_needs_description_and_examples(tiny, lib, tmp_path):
    from patchlm.route.evaluate import evaluate_router

    p = make_patch(tiny, seed=4).save(tmp_path / "p4")
    lib.add(p, description="no examples here", name="gamma")
    with pytest.raises(ConfigError, match=r"expert gamma .* has no example inputs"):
        evaluate_router(tiny, lib, {"alpha": make_task("alpha")}, RouteConfig(router="glider-global"))


# ---------------------------------------------------------------- routed model
def test_topk_weights_sum_to_one():
    w = rt.topk_weights(torch.randn(5, 7, 4), 2)
    assert torch.allclose(w.sum(-1), torch.ones(5, 7))
    assert ((w > 0).sum(-1) == 2).all()
    assert torch.allclose(rt.topk_weights(torch.randn(3, 2), 5).sum(-1), torch.ones(3))  # k > E: all experts


def test_one_hot_sequence_routing_equals_the_expert_alone_and_skips_the_others(tiny):
    patches = [make_patch(tiny, seed=s) for s in (1, 2, 3)]
    ids = sample_ids()
    with torch.no_grad():
        want = []
        for row, e in ((0, 2), (1, 0)):
            m = patches[e].apply(tiny)
            want.append(m(input_ids=ids[row:row + 1]).logits)
            from patchlm.adapters.lora import LoraKind

            LoraKind().detach(tiny.model)
        state = rt.install(tiny.model, patches, top_k=1)
        state.weights = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
        got = tiny.model(input_ids=ids).logits
    assert torch.allclose(got[0:1], want[0], atol=1e-5) and torch.allclose(got[1:2], want[1], atol=1e-5)
    assert state.calls[1] == 0 and state.calls[0] > 0 and state.calls[2] > 0  # expert 1 ran on no row at all
    n_mods = len(rt.routed_modules(tiny.model))
    assert state.calls[0] == state.calls[2] == n_mods * ids.shape[1]  # each ran on its one sequence only
    rt.remove(tiny.model)
    assert not rt.routed_modules(tiny.model)


def test_token_level_gates_match_a_dense_reference(tiny):
    patches = [make_patch(tiny, seed=s) for s in (1, 2, 3)]
    state = rt.install(tiny.model, patches, top_k=2)
    mods = rt.routed_modules(tiny.model)
    g = torch.Generator().manual_seed(0)
    for m in mods.values():
        with torch.no_grad():
            for p in m.gates:
                p.copy_(torch.randn(p.shape, generator=g))
    m = next(iter(mods.values()))
    x = torch.randn(2, 5, m.base.in_features, generator=g)
    with torch.no_grad():
        got = m(x)
        xf = x.reshape(-1, x.shape[-1])
        logits = torch.nn.functional.layer_norm(xf, (xf.shape[-1],)) @ m.gate_matrix().T / math.sqrt(xf.shape[-1])
        top, idx = logits.topk(2, -1)
        w = torch.softmax(top, -1)
        ref = m.base(xf)
        for t in range(xf.shape[0]):
            for j in range(2):
                ref[t] += w[t, j] * m.expert(int(idx[t, j]), xf[t:t + 1])[0]
    assert torch.allclose(got.reshape(-1, got.shape[-1]), ref, atol=1e-5)
    assert sum(state.calls) == 2 * xf.shape[0]  # each token ran on exactly its two experts
    rt.remove(tiny.model)


@pytest.mark.parametrize("level, fixed", [("token", False), ("sequence", False), ("token", True)])
def test_dense_dispatch_equals_split_dispatch(tiny, level, fixed):
    """The stacked dense dispatch computes the split dispatch's sum (experts adapting different modules, so some
    modules lack an expert), and counts the same routed rows."""
    patches = [make_patch(tiny, seed=1), make_patch(tiny, seed=2, targets="all-linear"), make_patch(tiny, seed=3)]
    ids = sample_ids()
    out, calls = {}, {}
    for dispatch in ("split", "dense"):
        state = rt.install(tiny.model, patches, top_k=2, level=level, dispatch=dispatch)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in rt.routed_modules(tiny.model).values():
                for p in m.gates:
                    p.copy_(torch.randn(p.shape, generator=g))
            if fixed:
                state.weights = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
            out[dispatch] = tiny.model(input_ids=ids).logits
        calls[dispatch] = list(state.calls)
        rt.remove(tiny.model)
    assert torch.allclose(out["split"], out["dense"], atol=1e-5)
    assert calls["split"] == calls["dense"] and sum(calls["dense"]) > 0
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
    assert not torch.allclose(plain, out["dense"], atol=1e-3)  # the experts did change the output


def test_auto_dispatch_is_dense_only_where_the_stacked_rank_is_small(tiny):
    patches = [make_patch(tiny, seed=s, r=1) for s in (1, 2)]
    rt.install(tiny.model, patches)
    mods = rt.routed_modules(tiny.model)
    for m in mods.values():
        d_in, d_out = m.base.in_features, m.base.out_features
        assert m.dense_ok == (d_in * d_out >= 2 * (d_in + d_out))
    rt.remove(tiny.model)
    from patchlm.errors import PatchlmError

    for make in (lambda: rt.install(tiny.model, patches, dispatch="fast"), lambda: RouteConfig(dispatch="fast")):
        with pytest.raises(PatchlmError, match="dispatch"):
            make()


def test_sequence_level_routes_whole_sequences(tiny):
    patches = [make_patch(tiny, seed=s) for s in (1, 2, 3)]
    state = rt.install(tiny.model, patches, top_k=2, level="sequence")
    with torch.no_grad():
        for m in rt.routed_modules(tiny.model).values():
            for p in m.gates:
                p.normal_()
        tiny.model(input_ids=sample_ids())
    t = sample_ids().shape[1]
    assert all(c % t == 0 for c in state.calls)  # an expert runs on whole sequences
    assert torch.allclose(state.mass.sum(-1), torch.full((2,), float(t * len(rt.routed_modules(tiny.model)))))
    rt.remove(tiny.model)


# ---------------------------------------------------------------- gates, GLIDER, Arrow, evaluation
def test_gates_train_load_and_refuse_another_library(tiny, lib, tmp_path):
    from patchlm.route.gates import load_gates, train_gates

    rt.install(tiny.model, lib.patches())
    cfg = RouteConfig(gate_steps=3, gate_batch_size=4, gate_max_length=32)
    out = train_gates(tiny, lib, {"alpha": make_task("alpha"), "beta": make_task("beta")}, cfg)
    meta = json.loads((out / "gates.json").read_text())
    assert meta["experts"] == ["alpha", "beta"] and meta["library"] == lib.library_id
    m = next(iter(rt.routed_modules(tiny.model).values()))
    g = m.gates[0].detach()
    assert g.abs().sum() > 0 and abs(float(g.mean())) < 1e-4 and abs(float(g.std(unbiased=False)) - 1) < 0.1
    assert not any(p.requires_grad for p in tiny.model.parameters())
    load_gates(tiny.model, lib)
    with pytest.raises(ConfigError, match="exists"):
        train_gates(tiny, lib, {"alpha": make_task("alpha"), "beta": make_task("beta")}, cfg)
    other = Library.open_or_create(tmp_path / "other")
    other.add(lib.path / "experts" / "beta", description="d", name="beta")
    other.add(lib.path / "experts" / "alpha", description="d", name="alpha")
    shutil.copytree(out, other.path / "gates")
    with pytest.raises(ConfigError, match="trained for another library"):
        load_gates(tiny.model, other)
    rt.remove(tiny.model)


def test_glider_global_routes_each_task_to_its_expert(tiny, lib):
    from patchlm.route.evaluate import evaluate_router

    tasks = {"alpha": make_task("alpha"), "beta": make_task("beta")}
    row = evaluate_router(tiny, lib, tasks, RouteConfig(router="glider-global", global_from="input", top_k=1,
                                                        limit=8, global_scale=10.0))
    assert row["routing_accuracy"] == 1.0
    assert row["expert_calls"][0] > 0 and row["expert_calls"][1] > 0


def test_glider_with_written_instructions_and_gates_runs(tiny, lib):
    from patchlm.route.evaluate import evaluate_router
    from patchlm.route.gates import train_gates

    tasks = {"alpha": make_task("alpha"), "beta": make_task("beta")}
    rt.install(tiny.model, lib.patches())
    train_gates(tiny, lib, tasks, RouteConfig(gate_steps=2, gate_batch_size=4, gate_max_length=32))
    rt.remove(tiny.model)
    row = evaluate_router(tiny, lib, tasks, RouteConfig(router="glider", limit=4, instruction_tokens=4))
    assert len(row["expert_instructions"]) == 2 and row["held_in_mean"] is not None
    assert row["routing_accuracy"] is not None


def test_oracle_uniform_best_base_and_arrow_rows(tiny, lib):
    from patchlm.route.evaluate import evaluate_router

    tasks = {"alpha": make_task("alpha"), "beta": make_task("beta"), "held": make_task("alpha")}
    oracle = evaluate_router(tiny, lib, tasks, RouteConfig(router="oracle", limit=4))
    assert oracle["routing_accuracy"] == 1.0 and oracle["held_out_mean"] is not None
    uni = evaluate_router(tiny, lib, tasks, RouteConfig(router="uniform", limit=4))
    assert uni["expert_calls"][0] == uni["expert_calls"][1] > 0  # every expert runs on every sequence
    best = evaluate_router(tiny, lib, tasks, RouteConfig(router="best", limit=4))
    assert best["best_expert"] in ("alpha", "beta")
    base = evaluate_router(tiny, lib, tasks, RouteConfig(router="base", limit=4))
    arrow = evaluate_router(tiny, lib, tasks, RouteConfig(router="arrow", limit=4))
    assert arrow["held_in_mean"] is not None and base["routing_accuracy"] is None
    assert not any("lora" in type(m).__name__.lower() for m in tiny.model.modules())  # PEFT unloaded


def test_arrow_refuses_experts_of_different_rank(tiny, tmp_path):
    from patchlm.route.evaluate import evaluate_router

    lib = Library.open_or_create(tmp_path / "mixed")
    lib.add(make_patch(tiny, seed=1, r=4).save(tmp_path / "a"), description="a", name="a")
    lib.add(make_patch(tiny, seed=2, r=2).save(tmp_path / "b"), description="b", name="b")
    with pytest.raises(ConfigError, match="expert b differs from a in its rank"):
        evaluate_router(tiny, lib, {"alpha": make_task("alpha")}, RouteConfig(router="arrow", limit=2))


# ---------------------------------------------------------------- CLI
def _task_file(tmp_path, name: str):
    """A local JSONL task file with the toy task's examples."""
    t = make_task(name)
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"text": e["text"], "label": ["no", "yes"][e["label"]]}) + "\n"
                         for e in t.train + t.validation + t.test))
    return f


def test_cli_library_add_list_eval_and_bad_input(tiny, tmp_path, capsys):
    from conftest import run_cli

    lib = tmp_path / "lib"
    ex = tmp_path / "ex.txt"
    ex.write_text("the apple and the banana\nthe cherry\n")
    for i, name in enumerate(("alpha", "beta")):
        p = make_patch(tiny, seed=i + 1).save(tmp_path / f"p-{name}")
        code, _, err = run_cli(["route", "library", "add", str(lib), str(p), "--description", f"task {name}",
                                "--examples", str(ex), "--name", name, "--task", str(_task_file(tmp_path, name))],
                               capsys)
        assert code == 0, err
    code, out, _ = run_cli(["route", "library", "list", str(lib), "--json"], capsys)
    assert code == 0 and [e["name"] for e in json.loads(out)["experts"]] == ["alpha", "beta"]
    task = str(_task_file(tmp_path, "alpha"))
    code, out, err = run_cli(["route", "eval", str(lib), "--router", "uniform", "--task", task, "--limit", "4",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["held_in_mean"] is not None  # alpha was added with this file as its task

    def one_line_exit_2(argv, match):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err

    one_line_exit_2(["route", "eval", str(lib), "--router", "uniform", "--task", task, "--top-k", "3"],
                    "top_k 3 is larger than the library's 2 experts (option --top-k)")
    one_line_exit_2(["route", "eval", str(tmp_path), "--router", "uniform", "--task", task], "no patch library")
    one_line_exit_2(["route", "eval", str(lib), "--router", "phatgoose", "--task", task], "no trained gates")
    other = make_patch(tiny, seed=5)
    other.base = {**other.base, "fingerprint": "blake2b:feedface"}
    other.save(tmp_path / "other")
    one_line_exit_2(["route", "library", "add", str(lib), str(tmp_path / "other"), "--description", "x"],
                    "blake2b:feedface")
    p3 = make_patch(tiny, seed=6).save(tmp_path / "p3")
    lib2 = tmp_path / "lib2"
    assert run_cli(["route", "library", "add", str(lib2), str(p3), "--description", "x", "--name", "solo"],
                   capsys)[0] == 0
    one_line_exit_2(["route", "eval", str(lib2), "--router", "glider-global", "--task", task, "--top-k", "1"],
                    "expert solo of library")
    code, _, err = run_cli(["route", "gates", str(lib), "--gate-steps", "2", "--gate-batch-size", "4",
                            "--gate-max-length", "32"], capsys)
    assert code == 0, err
    shutil.copytree(lib / "gates", lib2 / "gates")
    one_line_exit_2(["route", "eval", str(lib2), "--router", "phatgoose", "--task", task, "--top-k", "1"],
                    "trained for another library")
    code, out, err = run_cli(["route", "eval", str(lib), "--router", "phatgoose", "--task", task, "--limit", "4",
                              "--json"], capsys)
    assert code == 0, err
