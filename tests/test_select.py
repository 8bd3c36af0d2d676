"""Data selection (issue 17): SHED's Shapley loop against closed forms, its samplers, the baselines, resume, the
subset file that `patchlm train` reads, and every bad input (one line, exit 2, nothing written).

Most tests replace the sentence encoder by a deterministic bag-of-words embedding (fast, offline); the tests
marked slow use the real built-in minilm-l6."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from patchlm.errors import ConfigError, DataError, TrainingInterrupted, UnknownNameError
from patchlm.select import SelectConfig, group_leave_out, qocs, qwcs, select_subset
from patchlm.select.baselines import kcenter_greedy, knn_shapley_values, perplexity_select, random_select
from patchlm.select.shed import Stopped


def _bow(texts, dim: int = 64) -> torch.Tensor:
    """A deterministic unit-norm bag-of-words embedding (the stand-in for minilm-l6)."""
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1.0
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


@pytest.fixture()
def fake_embed(monkeypatch):
    from patchlm.select.embed import Embedder

    monkeypatch.setattr(Embedder, "embed", lambda self, texts: _bow(list(texts)))


def _rows(n: int = 60):
    good = ["great", "wonderful", "lovely", "superb", "brilliant", "fine"]
    bad = ["awful", "terrible", "boring", "dreadful", "bad", "poor"]
    out = []
    for i in range(n):
        pos = i % 2 == 0
        words = good if pos else bad
        out.append({"text": f"a {words[i % 6]} {words[(i // 2) % 6]} film number {i}",
                    "label": "positive" if pos else "negative"})
    return out


@pytest.fixture()
def csv_task(tmp_path):
    import pandas as pd

    path = tmp_path / "reviews.csv"
    pd.DataFrame(_rows()).to_csv(path, index=False)
    return path


def _load(path, **kw):
    from patchlm.data import load_task

    return load_task(str(path), **kw)


# ---------------------------------------------------------------- the Shapley loop against closed forms
def test_additive_utility_gives_each_proxy_its_weight_exactly():
    w = np.array([0.3, -0.1, 0.0, 0.7, 0.2])
    est = group_leave_out(5, lambda s: float(w[s].sum()), permutations=4, group_size=1, seed=0,
                          empty_utility=lambda: 0.0)
    np.testing.assert_allclose(est.values, w, atol=1e-12)
    np.testing.assert_allclose(est.stderr, 0.0, atol=1e-12)
    assert est.u_full == pytest.approx(w.sum()) and est.u_empty == 0.0
    assert est.evaluations == 2 + 4 * (5 - 1)  # u(all), u(none), then every non-empty removal
    assert 0.0 in est.values  # values of exactly 0 are kept (the official code drops them)


def test_groups_share_the_drop_and_each_permutation_sums_to_the_total():
    u = lambda s: math.sqrt(len(s)) + (0.5 if 2 in s else 0.0)  # noqa: E731 - not additive
    est = group_leave_out(7, u, permutations=3, group_size=3, seed=1, empty_utility=lambda: -1.0)
    np.testing.assert_allclose(est.contributions.sum(1), u(list(range(7))) - (-1.0))
    # the empty set is measured, not taken as 0
    assert est.u_empty == -1.0
    # standard error: sample std over permutations / sqrt(R)
    np.testing.assert_allclose(est.stderr, est.contributions.std(0, ddof=1) / math.sqrt(3))


def test_group_of_two_hand_computed():
    # n=2, group size 2: one removal from {0,1} to {} per permutation; the drop 0.8 - 0.2 is split equally
    est = group_leave_out(2, lambda s: 0.8 if s else 0.2, permutations=2, group_size=2, seed=0)
    np.testing.assert_allclose(est.values, [0.3, 0.3])


def test_stopped_loop_resumes_to_the_uninterrupted_values():
    rng = np.random.default_rng(0)
    w = rng.normal(size=9)
    u = lambda s: float(np.tanh(w[s].sum()))  # noqa: E731
    full = group_leave_out(9, u, permutations=3, group_size=2, seed=5)
    saved = {}
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] == 4

    with pytest.raises(Stopped):
        group_leave_out(9, u, permutations=3, group_size=2, seed=5, checkpoint=saved.update, stop=stop)
    assert saved["perm"] == 0 and saved["round"] == 4
    resumed = group_leave_out(9, u, permutations=3, group_size=2, seed=5, state=dict(saved))
    np.testing.assert_array_equal(resumed.values, full.values)
    assert resumed.evaluations == full.evaluations


# ---------------------------------------------------------------- samplers
def test_qocs_takes_whole_clusters_by_value_then_the_nearest_members():
    members = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    assert qocs([0.1, 0.5, 0.3], members, 6) == [(3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 2)]
    assert qocs([0.1, 0.5, 0.3], members, 3) == [(3, 1), (4, 1), (5, 2)]


def test_qwcs_ends_at_any_budget_and_draws_without_replacement():
    members = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    every = qwcs([5.0, -5.0, 0.0], members, 9, beta=3.0, seed=0)
    assert sorted(i for i, _ in every) == list(range(9))
    assert all(i in members[c] for i, c in every)
    # more than is drawable: it stops when the clusters run out (the official code loops forever)
    assert len(qwcs([1.0, 2.0, 3.0], members, 50, beta=1.0, seed=0)) == 9
    # a high beta prefers the best cluster: its members come first
    first = qwcs([0.0, 0.0, 10.0], [list(range(10)), list(range(10, 20)), list(range(20, 30))], 5, beta=50.0,
                 seed=1)
    assert all(c == 2 for _, c in first)
    assert qwcs([0.0, 0.0, 0.0], members, 4, beta=1.0, seed=3) == qwcs([0.0, 0.0, 0.0], members, 4, 1.0, 3)


# ---------------------------------------------------------------- baselines
def test_kcenter_greedy_on_a_line():
    x = np.array([[0.0], [1.0], [10.0], [4.0], [6.0]])
    chosen, gaps = kcenter_greedy(x, 3, seed=0)
    first = chosen[0]
    assert len(set(chosen)) == 3 and gaps[0] == math.inf
    # brute force: each next centre is the point farthest from the chosen ones
    for k in range(1, 3):
        d = np.abs(x[:, 0][:, None] - x[chosen[:k], 0][None]).min(1)
        d[chosen[:k]] = -1
        assert chosen[k] == int(d.argmax()) and gaps[k] == pytest.approx(d.max())
    assert first in range(5)


def _knn_shapley_reference(xtr, ytr, xte, yte, k):
    """The closed-form KNN-Shapley recursion of Jia et al. (2019), written out for one test point at a time."""
    n = len(xtr)
    out = np.zeros(n)
    for x, y in zip(xte, yte):
        order = np.argsort(((xtr - x) ** 2).sum(1), kind="stable")
        s = np.zeros(n)
        s[order[-1]] = float(ytr[order[-1]] == y) / n
        for i in range(n - 2, -1, -1):
            s[order[i]] = s[order[i + 1]] + (float(ytr[order[i]] == y) - float(ytr[order[i + 1]] == y)) / k * \
                min(k, i + 1) / (i + 1)
        out += s
    return out / len(xte)


def test_knn_shapley_matches_the_closed_form():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(30, 4)), rng.normal(size=(6, 4))
    ytr, yte = rng.integers(0, 2, 30), rng.integers(0, 2, 6)
    got = knn_shapley_values(xtr, ytr, xte, yte, k=3)
    np.testing.assert_allclose(got, _knn_shapley_reference(xtr, ytr, xte, yte, 3), atol=1e-6)


def test_random_and_perplexity_selection():
    r = random_select(20, 5, seed=0)
    assert len(set(r)) == 5 and r == sorted(r) and r == random_select(20, 5, seed=0)
    ppl = np.array([5.0, 1.0, 9.0, 3.0, 7.0])
    assert perplexity_select(ppl, 2, "low") == [1, 3]
    assert perplexity_select(ppl, 2, "high") == [2, 4]
    assert perplexity_select(ppl, 3, "middle") == [3, 0, 4]


def test_perplexity_filter_scores_with_the_base_model(tiny, toy_task):
    from patchlm.select.baselines import example_perplexities

    ppl = example_perplexities(tiny.model, tiny.tokenizer, toy_task, toy_task.train[:6], batch_size=4,
                               max_length=64)
    assert ppl.shape == (6,) and np.all(np.isfinite(ppl)) and np.all(ppl > 1)
    one = example_perplexities(tiny.model, tiny.tokenizer, toy_task, toy_task.train[2:3], batch_size=1,
                               max_length=64)
    assert one[0] == pytest.approx(ppl[2], rel=1e-4)  # padding in a batch does not change an example's score


# ---------------------------------------------------------------- utilities
def test_probe_utility_empty_is_chance_and_one_label_predicts_it():
    from patchlm.select.utility import ProbeUtility

    x = np.eye(4)
    p = ProbeUtility(x, np.array([0, 0, 1, 1]), x, np.array([0, 1, 1, 1]), num_labels=2)
    assert p([]) == 0.5 and p.empty() == 0.5
    assert p([0, 1]) == 0.25  # only label 0 seen
    assert p([0, 1, 2, 3]) == 0.75  # the probe recovers the training points' labels on the same points


def test_lora_utility_trains_from_the_clean_base_each_time(tiny, toy_task):
    from patchlm.select.utility import LoraUtility

    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cfg = SelectConfig(lora_rank=2, lora_epochs=1.0, val_limit=8, batch_size=4, max_length=64, progress=False)
    u = LoraUtility(tiny, toy_task, toy_task.train[:8], toy_task.validation, cfg)
    a = u([0, 1, 2, 3])
    assert u([0, 1, 2, 3]) == a  # deterministic, and the first call left no LoRA behind
    assert 0.0 <= u.empty() <= 1.0
    after = tiny.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- select_subset and the subset file
def test_shed_probe_selects_whole_valued_clusters(csv_task, fake_embed):
    task = _load(csv_task)
    cfg = SelectConfig(method="shed", utility="probe", clusters=8, group_size=2, permutations=3, fraction=0.25,
                       progress=False)
    sel = select_subset(task, cfg)
    assert len(sel.indices) == round(0.25 * len(task.train)) == len(set(sel.indices))
    r = sel.report
    assert len(r["clusters"]) == 8 and r["evaluations"] == 2 + 3 * (4 - 1)
    assert all(c["stderr"] is not None for c in r["clusters"])
    by = {c["cluster"]: c["value"] for c in r["clusters"]}
    assert sel.values == [by[c] for c in sel.clusters]
    ranked = sorted(by, key=lambda c: (-by[c], c))
    assert list(dict.fromkeys(sel.clusters)) == ranked[: len(set(sel.clusters))]
    assert select_subset(task, cfg).indices == sel.indices  # seeded end to end


@pytest.mark.parametrize("method", ["random", "full", "kcenter", "knn-shapley"])
def test_baselines_share_the_interface(csv_task, fake_embed, method):
    task = _load(csv_task)
    sel = select_subset(task, SelectConfig(method=method, count=7, progress=False))
    n = len(task.train) if method == "full" else 7
    assert len(sel.indices) == len(set(sel.indices)) == n
    assert len(sel.values) == len(sel.clusters) == n


def test_subset_file_trains_with_patchlm_train(csv_task, fake_embed, tmp_path, capsys):
    out = tmp_path / "sub.jsonl"
    code, _, err = run_cli(["select", "--task", str(csv_task), "--method", "shed", "--utility", "probe",
                            "--clusters", "6", "--group-size", "2", "--permutations", "2", "--fraction", "0.5",
                            "--out", str(out), "-q"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 24 and {"text", "label", "cluster", "value", "pool_index"} <= set(rows[0])
    assert {r["label"] for r in rows} <= {"negative", "positive"}
    report = json.loads((tmp_path / "sub.report.json").read_text())
    assert report["method"] == "shed" and len(report["clusters"]) == 6
    assert not (tmp_path / "sub.jsonl.state").exists()
    sub = _load(out)
    assert sub.kind == "classification" and sub.labels == ["negative", "positive"]
    pool = _load(csv_task).train
    assert all(pool[r["pool_index"]]["text"] == r["text"] for r in rows)
    code, _, err = run_cli(["train", "--model", "tiny-random-llama", "--task", str(out), "--rank", "2",
                            "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"), "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "patch" / "patch.json").exists()


def test_chat_pool_with_lora_utility_writes_messages(tmp_path, fake_embed, capsys):
    chats = [{"messages": [{"role": "user", "content": f"question {i} about {'cats' if i % 2 else 'dogs'}"},
                           {"role": "assistant", "content": f"answer {i}: they are {'small' if i % 3 else 'big'}"}]}
             for i in range(40)]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "chat-sub.jsonl"
    code, _, err = run_cli(["select", "--task", str(src), "--method", "shed", "--utility", "lora", "--model",
                            "tiny-random-llama", "--clusters", "4", "--group-size", "2", "--permutations", "1",
                            "--lora-rank", "2", "--lora-epochs", "1", "--val-limit", "4", "--max-length", "48",
                            "--count", "8", "--out", str(out), "-q"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and "messages" in rows[0] and "text" not in rows[0]
    report = json.loads((tmp_path / "chat-sub.report.json").read_text())
    assert report["u_empty"] < 0 and report["evaluations"] == 3  # minus the validation loss; 2 + (2 - 1)
    sub = _load(out)
    assert sub.kind == "chat"
    code, _, err = run_cli(["train", "--model", "tiny-random-llama", "--task", str(out), "--rank", "2", "--steps",
                            "1", "--batch-size", "2", "--max-length", "48", "--out", str(tmp_path / "r"), "-q"],
                           capsys)
    assert code == 0, err


def test_interrupted_shed_resumes_to_the_uninterrupted_subset(csv_task, fake_embed, tmp_path, monkeypatch):
    import patchlm.select.run as run

    task = _load(csv_task)
    cfg = SelectConfig(method="shed", utility="probe", clusters=8, group_size=2, permutations=3, fraction=0.25,
                       progress=False)
    whole, _, _ = run.run_selection(task, cfg, tmp_path / "a.jsonl")

    class StopAfter3(run.StopRequest):
        calls = 0

        def __call__(self):
            StopAfter3.calls += 1
            return StopAfter3.calls == 3

    monkeypatch.setattr(run, "StopRequest", StopAfter3)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run.run_selection(task, cfg, tmp_path / "b.jsonl")
    assert not (tmp_path / "b.jsonl").exists() and (tmp_path / "b.jsonl.state" / "shapley.safetensors").exists()
    with pytest.raises(Exception, match="--resume"):  # neither resumed nor forced: refused
        run.run_selection(task, cfg, tmp_path / "b.jsonl")
    with pytest.raises(ConfigError, match="permutations"):  # other settings: refused by name
        run.run_selection(task, SelectConfig(**{**cfg.to_dict(), "permutations": 4}), tmp_path / "b.jsonl",
                          resume=True)
    monkeypatch.setattr(run, "StopRequest", StopAfter3.__mro__[1])
    resumed, out, _ = run.run_selection(task, cfg, tmp_path / "b.jsonl", resume=True)
    assert resumed.indices == whole.indices and resumed.values == whole.values
    assert (tmp_path / "a.jsonl").read_text() == out.read_text()
    assert not (tmp_path / "b.jsonl.state").exists()


def test_embeddings_are_cached_by_content(tmp_path, monkeypatch):
    import patchlm.select.embed as embed

    monkeypatch.setenv("PATCHLM_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(embed, "load_base", lambda name: type("B", (), {"model": None, "tokenizer": None})())
    monkeypatch.setattr(embed, "encode", lambda m, t, texts, *a: calls.append(len(texts)) or _bow(texts))
    e = embed.Embedder("minilm-l6", 8, 32)
    a = e.embed(["one text", "another text"])
    b = e.embed(["one text", "another text"])
    c = e.embed(["one text", "a third"])
    assert calls == [2, 2] and torch.equal(a, b) and not torch.equal(a, c)
    assert len(list((tmp_path / "select" / "embeddings").glob("*.safetensors"))) == 2


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
@pytest.mark.parametrize(("args", "needle"), [
    (["--fraction", "0"], "fraction"),
    (["--fraction", "1.5"], "fraction"),
    (["--count", "0"], "count"),
    (["--count", "100000"], "larger than the training pool"),
    (["--clusters", "1000"], "clusters"),
    (["--utility", "oracle"], "unknown utility"),
    (["--method", "best"], "unknown selection method"),
    (["--sampler", "greedy"], "unknown sampler"),
    (["--permutations", "0"], "permutations"),
])
def test_bad_options_exit_2_and_write_nothing(csv_task, fake_embed, tmp_path, capsys, args, needle):
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(["select", "--task", str(csv_task), "--utility", "probe", *args, "--out", str(out)],
                           capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [csv_task]


def test_bad_data_exit_2_and_write_nothing(tmp_path, fake_embed, capsys):
    import pandas as pd

    nocol = tmp_path / "nocol.csv"
    pd.DataFrame({"review": ["a", "b"], "label": [0, 1]}).to_csv(nocol, index=False)
    tiny = tmp_path / "tiny.csv"  # 5 rows: the 10% validation split rounds to nothing
    pd.DataFrame(_rows(5)).to_csv(tiny, index=False)
    cases = [
        ([str(nocol)], ["--utility", "probe"], "no text column"),
        ([str(tiny)], ["--utility", "probe", "--clusters", "2"], "empty validation split"),
        ([str(tiny)], ["--method", "knn-shapley"], "empty validation split"),
    ]
    for task, args, needle in cases:
        out = tmp_path / "o.jsonl"
        code, _, err = run_cli(["select", "--task", *task, *args, "--out", str(out)], capsys)
        assert code == 2 and needle in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run_cli(["select", "--task", str(tiny), "--method", "random", "--out", str(tmp_path / "o.csv")],
                           capsys)
    assert code == 2 and ".jsonl" in err
    (tmp_path / "taken.jsonl").write_text("keep\n")
    code, _, err = run_cli(["select", "--task", str(tiny), "--method", "random", "--out",
                            str(tmp_path / "taken.jsonl")], capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "taken.jsonl").read_text() == "keep\n"


def test_library_errors_name_fields():
    with pytest.raises(ConfigError) as e:
        SelectConfig(fraction=-1)
    assert e.value.field == "fraction"
    with pytest.raises(UnknownNameError):
        SelectConfig(utility="nope")
    from patchlm.data.task import Task

    chat = Task(name="c", kind="chat", train=[{"messages": []}] * 3, validation=[{"messages": []}], test=[])
    with pytest.raises(ConfigError, match="probe utility needs labels"):
        select_subset(chat, SelectConfig(utility="probe", clusters=2))
    with pytest.raises(ConfigError, match="needs labels"):
        select_subset(chat, SelectConfig(method="knn-shapley"))
    empty = Task(name="e", kind="chat", train=[], validation=[], test=[])
    with pytest.raises(DataError, match="empty training split"):
        select_subset(empty, SelectConfig(method="random"))


# ---------------------------------------------------------------- the real encoder
@pytest.mark.slow
def test_minilm_embeddings_are_unit_norm_and_similar_texts_close(tmp_path, monkeypatch):
    from patchlm.select.embed import Embedder

    monkeypatch.setenv("PATCHLM_HOME", str(tmp_path))
    e = Embedder("minilm-l6", 2, 64)
    x = e.embed(["the film was wonderful", "a wonderful movie", "stock prices fell sharply today"])
    assert x.shape == (3, 384)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(3))
    assert float(x[0] @ x[1]) > float(x[0] @ x[2])
    # batching and length-sorting do not change a text's embedding
    from patchlm.models import load_base
    from patchlm.select.embed import encode

    b = load_base("minilm-l6")
    single = encode(b.model, b.tokenizer, ["a wonderful movie"], 1, 64)
    torch.testing.assert_close(single[0], x[1], atol=1e-5, rtol=1e-5)
