"""Model-GLUE: similarity and families by hand, selection heuristics on a scorer with a known optimum, CMA-ES,
and the whole recipe on tiny patches."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge_patches import lora_patch

from patchlm.errors import ConfigError
from patchlm.merge import glue as G
from patchlm.merge import glue_runner as R

# Two task experts (member 0 knows task A, member 1 task B) and a harmful member 2 that knows little of both.
SKILLS = [[1.0, 0.0], [0.0, 1.0], [0.1, 0.1]]


def concave_scorer(coefs: dict[int, float]) -> float:
    """mean over tasks of sqrt(skill of the merge), minus penalties for weights not summing to one or negative."""
    tasks = [sum(w * SKILLS[i][t] for i, w in coefs.items()) for t in range(2)]
    total = sum(coefs.values())
    negative = sum(max(0.0, -w) for w in coefs.values())
    return sum(math.sqrt(max(0.0, s)) for s in tasks) / 2 - 0.5 * (total - 1) ** 2 - negative


def test_column_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert G.column_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert G.column_cosine(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ConfigError):
        G.column_cosine(a, torch.ones(3, 2))


def test_cluster_by_threshold_and_architecture():
    sim = [[1, .97, .5, .96], [.97, 1, .6, .99], [.5, .6, 1, .5], [.96, .99, .5, 1]]
    assert G.cluster(sim, 0.95) == [[0, 1, 3], [2]]
    assert G.cluster(sim, 0.965) == [[0, 1], [2], [3]]  # joins only when similar to the family's FIRST member
    assert G.cluster(sim, 0.95, ["llama", "llama", "llama", "gemma"]) == [[0, 1], [2], [3]]


def test_greedy_average_keeps_experts_and_leaves_the_harmful_member_out():
    sel = G.greedy_average([0, 1, 2], concave_scorer)
    assert sel.weights == {0: 0.5, 1: 0.5}
    assert sel.score == pytest.approx(math.sqrt(0.5))
    assert [s["kept"] for s in sel.steps] == [True, True, False]
    # the rejected candidate was the uniform average of three: (1/3 + 0.1/3) per task
    assert sel.steps[2]["score"] == pytest.approx(math.sqrt(1.1 / 3))
    assert "left out" in sel.steps[2]["reason"]


def test_greedy_coefficient_searches_the_grid():
    sel = G.greedy_coefficient([0, 1, 2], concave_scorer)
    assert sel.weights == pytest.approx({0: 0.5, 1: 0.5})
    assert sel.steps[1]["coefficient"] == pytest.approx(0.5)
    assert sel.steps[2]["kept"] is False and sel.steps[2]["coefficient"] == pytest.approx(0.1)


def test_similarity_order():
    sim = [[1, .2, .9], [.2, 1, .3], [.9, .3, 1]]
    calls = []

    def scorer(c):
        calls.append(dict(c))
        return concave_scorer(c)

    sel = G.similarity_selection(0, sim, [0, 1, 2], scorer)
    assert calls[1] == pytest.approx({0: 0.5, 2: 0.5})  # most similar to the best model first
    assert sel.kept() == [0, 1]


def test_cmaes_finds_the_optimum_region():
    sel = G.cmaes_search([0, 1, 2], concave_scorer, trials=120, seed=0)
    assert sel.evaluations <= 120
    assert sel.score >= math.sqrt(0.5) - 0.02
    assert abs(sel.weights[2]) < 0.25 < min(sel.weights[0], sel.weights[1])


def test_run_glue_on_tiny_patches(tiny, toy_task):
    patches = [lora_patch(tiny, s, scale=0.02) for s in (1, 2, 3)]  # small updates, as trained LoRAs are
    calls = []

    def scorer(c):  # members 0 and 1 are the experts, 2 is harmful
        calls.append(c)
        return concave_scorer(c)

    report = R.run_glue(tiny, patches, ["a", "b", "bad"], [toy_task], heuristics=["average", "cmaes"], trials=30,
                        scorer=scorer)
    assert report["families"] == [["a", "b", "bad"]]  # random small LoRAs on one base: raw weights ~ identical
    assert report["similarity"]["matrix"][0][1] > 0.95
    assert report["heuristics"]["average"]["kept"] == ["a", "b"]
    assert report["heuristics"]["average"]["score"] > report["merge_all"]["score"]
    delta = R.run_glue(tiny, patches, ["a", "b", "bad"], [toy_task], heuristics=["average"], on="delta",
                       scorer=scorer)
    assert abs(delta["similarity"]["matrix"][0][1]) < 0.5  # independent random task vectors: nearly orthogonal


def test_patch_scorer_evaluates_the_merge(tiny, toy_task):
    from patchlm.evaluate import evaluate

    patches = [lora_patch(tiny, s) for s in (1, 2)]
    score = R.patch_scorer(tiny, patches, [toy_task], limit=8)
    s = score({0: 1.0})
    patches[0].apply(tiny)
    want = evaluate(tiny.model, tiny.tokenizer, toy_task, split="validation", limit=8)["accuracy"]
    from patchlm.patch import get_kind

    get_kind("lora").detach(tiny.model)
    assert s == pytest.approx(want)


def test_search_is_pure_on_a_similarity_matrix_and_a_scorer():
    sim = [[1, .97, .96], [.97, 1, .98], [.96, .98, 1]]
    rep = G.search(sim, concave_scorer, ["a", "b", "bad"], config=G.GlueConfig(heuristics=("average", "similarity")))
    assert rep["families"] == [["a", "b", "bad"]] and rep["merged_family"] == ["a", "b", "bad"]
    assert rep["heuristics"]["average"]["kept"] == ["a", "b"]
    assert rep["best"] == G.best_heuristic(rep["heuristics"])
    assert rep["heuristics"][rep["best"]]["score"] == max(h["score"] for h in rep["heuristics"].values())


def test_similarity_matrix_of_tensor_groups_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    sim = G.similarity_matrix(iter([[a, b, a], [a, a, -a]]), 3)
    assert sim[0][1] == pytest.approx((G.column_cosine(a, b) + 1.0) / 2)
    assert sim[0][2] == pytest.approx(0.0) and sim[2][0] == sim[0][2] and sim[1][1] == 1.0


@pytest.mark.parametrize("kw,field", [({"threshold": 1.5}, "threshold"), ({"on": "grads"}, "on"),
                                      ({"limit": 0}, "limit"), ({"trials": -1}, "trials"),
                                      ({"heuristics": ("average", "best")}, "heuristics")])
def test_glue_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        G.GlueConfig(**kw)
    assert e.value.field == field and field.rstrip("s") in str(e.value)


def test_best_merge_is_the_best_selection(tiny):
    patches = [lora_patch(tiny, s, scale=0.02) for s in (1, 2)]
    report = {"best": "average", "heuristics": {"average": {"weights": {"b": 0.25, "a": 0.75}, "score": 0.9}}}
    merged = R.best_merge(report, patches, ["a", "b"])
    assert merged.metrics["glue"] == {"heuristic": "average", "score": 0.9, "weights": {"b": 0.25, "a": 0.75}}
    want = R.merge_selection(patches, {0: 0.75, 1: 0.25})
    from patchlm.merge.patch_merge import patch_deltas

    got, ref = patch_deltas(merged), patch_deltas(want)
    assert set(got) == set(ref) and all(torch.allclose(got[n], ref[n], atol=1e-7) for n in ref)
    assert R.best_merge({"best": None, "heuristics": {}}, patches, ["a", "b"]) is None
