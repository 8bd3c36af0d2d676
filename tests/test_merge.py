"""Merge methods against hand-computed values, and the typed plan (YAML and CLI options give the same plan)."""

from __future__ import annotations

import math

import pytest
import torch

from patchlm.errors import ConfigError, UnknownNameError
from patchlm.merge import methods as M
from patchlm.merge.plan import evaluate_setting, layer_fraction, plan_from_config, plan_from_options

D0 = torch.tensor([1.0, -2.0, 3.0, 0.5])
D1 = torch.tensor([-1.0, 1.0, 2.0, -4.0])


def test_registry_has_every_method():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "fisher",
            "slerp"} <= set(M.METHODS)
    with pytest.raises(UnknownNameError, match="model_stock"):
        M.get_method("model_stock")


def test_parameters_and_defaults_come_from_the_signature():
    import inspect

    for m in M.METHODS.values():
        sig = inspect.signature(m.fn).parameters
        for key, p in m.all_params().items():
            assert M.param_key(p.arg) == key and p.arg in sig
            want = sig[p.arg].default
            assert (p.required, p.default) == ((True, None) if want is inspect.Parameter.empty else (False, want))
    ties = M.get_method("ties")
    assert ties.params["lambda"].arg == "lambda_" and "lambda_" not in ties.params
    assert set(ties.model_params) == {"weight", "density"} and not ties.random
    assert M.get_method("dare_ties").random and M.get_method("slerp").params["t"].required
    assert M.get_method("breadcrumbs").model_params["density"].default == 0.9
    assert M.param_key("lambda_") == "lambda" and M.param_key("fisher_floor") == "fisher_floor"


def test_a_new_method_is_one_decorated_function():
    @M.merge_method("scaled_sum_test", mergekit=False)
    def scaled(deltas, weight: M.Weight = 1.0, lambda_: M.Lambda = 2.0):
        """sum of weighted deltas times lambda."""
        return sum(w * d for w, d in zip(M._each(weight, len(deltas)), deltas)) * lambda_

    try:
        m = M.get_method("scaled_sum_test")
        assert m.params["lambda"].default == 2.0 and m.model_params["weight"].default == 1.0
        out = M.merge_tensor(m, "x", None, [D0, D1], [{"weight": 1.0}, {}], {"lambda": 0.5})
        assert torch.allclose(out, (D0 + D1) * 0.5)
        with pytest.raises(ConfigError, match="lambda"):
            M.validate_value(m, "lambda", "big")
    finally:
        M.METHODS.pop("scaled_sum_test")


def test_linear_normalized_and_not():
    # (1*D0 + 3*D1) / 4
    assert torch.allclose(M.linear([D0, D1], [1, 3]), torch.tensor([-0.5, 0.25, 2.25, -2.875]))
    assert torch.allclose(M.linear([D0, D1], [1, 3], normalize=False), torch.tensor([-2.0, 1.0, 9.0, -11.5]))


def test_task_arithmetic_lambda_and_normalize():
    assert torch.allclose(M.task_arithmetic([D0, D1], [1, 0.5]), torch.tensor([0.5, -1.5, 4.0, -1.5]))
    assert torch.allclose(M.task_arithmetic([D0, D1], [1, 0.5], lambda_=2.0), torch.tensor([1.0, -3.0, 8.0, -3.0]))
    assert torch.allclose(M.task_arithmetic([D0, D1], [1, 1], normalize=True), (D0 + D1) / 2)


def test_ties_by_hand():
    # trim to top-2 by magnitude: D0 -> [0,-2,3,0], D1 -> [0,0,2,-4]; elected signs of the sum [0,-2,5,-4]:
    # [+,-,+,-]; entry 0 has no agreeing (nonzero) value -> 0; disjoint mean of agreeing entries.
    out = M.ties([D0, D1], [1, 1], [0.5, 0.5])
    assert torch.allclose(out, torch.tensor([0.0, -2.0, 2.5, -4.0]))
    # sign election on weighted vectors: weight 3 on D1 flips entry 1 to + (sum -2 + 3 = 1)
    full = M.ties([D0, D1], [1, 3], [1.0, 1.0])
    # entry 0: 1 - 3 = -2 -> '-': only D1 (-3) agrees, divisor 3 -> -1
    # entry 1: -2 + 3 = 1 -> '+': only D1 (3), divisor 3 -> 1
    # entry 2: 3 + 6 -> +: (3 + 6) / 4 ; entry 3: 0.5 - 12 -> '-': -12 / 3
    assert torch.allclose(full, torch.tensor([-1.0, 1.0, 9 / 4, -4.0]))
    unnorm = M.ties([D0, D1], [1, 1], [0.5, 0.5], normalize=False)
    assert torch.allclose(unnorm, torch.tensor([0.0, -2.0, 5.0, -4.0]))


def test_dare_is_seeded_and_rescaled():
    d = torch.arange(1.0, 1001.0)
    a = M.dare_linear([d], [1.0], [0.3], seed=1, name="w")
    b = M.dare_linear([d], [1.0], [0.3], seed=1, name="w")
    c = M.dare_linear([d], [1.0], [0.3], seed=2, name="w")
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert 0.2 < kept.float().mean() < 0.4
    # mergekit's rescale: the kept entries scaled so the L1 norm is unchanged
    assert math.isclose(float(a.abs().sum()), float(d.abs().sum()), rel_tol=1e-5)
    inv = M.dare_linear([d], [1.0], [0.3], seed=1, name="w", rescale="inverse")
    assert torch.allclose(inv[kept], d[kept] / 0.3)
    none = M.dare_linear([d], [1.0], [0.3], seed=1, name="w", rescale=False)
    assert torch.equal(none[kept], d[kept]) and torch.equal(none != 0, kept)
    # density 1 keeps everything: DARE-TIES reduces to TIES without trimming
    assert torch.allclose(M.dare_ties([D0, D1], [1, 1], [1.0, 1.0], normalize=True),
                          M.ties([D0, D1], [1, 1], [1.0, 1.0]))


def test_breadcrumbs_by_hand():
    # n=4, density .5 -> keep 2; gamma .25 -> 1 top outlier; drop the 4-2-1 = 1 smallest
    # D0 |.|: .5 < 1 < 2 < 3 -> keep 1, -2 ; D1 |.|: 1(idx0) <= 1(idx1) < 2 < 4 -> keep idx1, idx2
    out = M.breadcrumbs([D0, D1], [1, 1], [0.5, 0.5], [0.25, 0.25])
    assert torch.allclose(out, torch.tensor([1.0, -1.0, 2.0, 0.0]))


def test_fisher_by_hand():
    f0, f1 = torch.ones(4), torch.tensor([1.0, 3.0, 1.0, 0.0])
    out = M.fisher([D0, D1], [1, 1], [f0, f1], fisher_floor=1e-12)
    want = torch.tensor([0.0, (-2 + 3) / 4, 2.5, 0.5])
    assert torch.allclose(out, want, atol=1e-6)


def test_slerp_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = M.slerp(a, b, 0.5)
    # angle 90 degrees: sin(45)/sin(90) on each endpoint
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    assert torch.allclose(M.slerp(a, b, 0.0), a) and torch.allclose(M.slerp(a, b, 1.0), b)
    # colinear -> lerp
    assert torch.allclose(M.slerp(a, 3 * a, 0.5), 2 * a)


def test_lazy_sequences_are_read_one_at_a_time():
    reads = []

    class Lazy:
        def __len__(self):
            return 2

        def __getitem__(self, k):
            reads.append(k)
            return [D0, D1][k]

    assert torch.allclose(M.ties(Lazy(), [1, 1], [0.5, 0.5]), M.ties([D0, D1], [1, 1], [0.5, 0.5]))
    assert reads == [0, 1, 0, 1]  # sign election, then the sum


# ---------------------------------------------------------------- plan
YAML = """
models:
  - model: ft-a
    parameters: {weight: 0.7, density: 0.5}
  - model: ft-b
    parameters: {weight: 0.3, density: 0.5}
base_model: base
merge_method: ties
parameters: {normalize: true, lambda: 0.9}
dtype: float32
"""


def test_yaml_and_options_give_the_same_plan(tmp_path):
    import yaml

    from patchlm.merge.plan import load_plan

    f = tmp_path / "ties.yml"
    f.write_text(YAML)
    a = load_plan(f)
    b = plan_from_options(["ft-a", "ft-b"], "ties", base="base", weights=[0.7, 0.3], densities=[0.5],
                          params={"normalize": True, "lambda": 0.9}, dtype="float32")
    assert a == b
    assert [e.model for e in a.inputs()] == ["ft-a", "ft-b"] and a.models[0].model == "base"
    assert plan_from_config(yaml.safe_load(YAML)) == a


def test_plan_parameter_resolution():
    plan = plan_from_config({"models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b"}],
                             "base_model": "base", "merge_method": "task_arithmetic",
                             "parameters": {"weight": [0.0, 1.0], "lambda": [{"filter": "mlp", "value": 0.5},
                                                                             {"value": 1.0}]}})
    shared, per = plan.params_for("model.layers.2.mlp.up_proj.weight", num_layers=5)
    assert shared["lambda"] == 0.5
    assert per[0]["weight"] == 2.0  # the model's own setting wins
    assert per[1]["weight"] == pytest.approx(0.5)  # gradient at layer 2 of 5: t = 0.5
    shared, per = plan.params_for("model.layers.4.self_attn.q_proj.weight", num_layers=5)
    assert shared["lambda"] == 1.0 and per[1]["weight"] == pytest.approx(1.0)
    assert layer_fraction("model.embed_tokens.weight", 5) == 0.0
    assert evaluate_setting([1, 2, 3], "x", 0.75) == pytest.approx(2.5)


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "model_stock", "models": ["a"], "base_model": "b"}, "model_stock"),
    ({"merge_method": "ties", "models": ["a"], "base_model": "b", "tokenizer": {"source": "union"}}, "tokenizer"),
    ({"merge_method": "ties", "models": ["a"], "base_model": "b", "chat_template": "chatml"}, "chat_template"),
    ({"merge_method": "ties", "models": ["a"], "base_model": "b", "parameters": {"epsilon": 0.1}}, "epsilon"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"density": 1.5}}], "base_model": "b"},
     "density"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"density": 0}}], "base_model": "b"}, "density"),
    ({"merge_method": "slerp", "models": ["a", "c"], "base_model": "b", "parameters": {"t": 1.5}}, "t"),
    ({"merge_method": "slerp", "models": ["a", "c"], "base_model": "b", "parameters": {"t": 0.5}}, "exactly two"),
    ({"merge_method": "ties", "models": ["a"]}, "base model"),
    ({"merge_method": "ties", "models": ["a"], "base_model": "b", "tokenizer_source": "union"}, "union"),
    ({"merge_method": "ties", "models": ["a"], "base_model": "b", "frobnicate": 1}, "frobnicate"),
    ({"merge_method": "ties", "models": [{"model": "a", "lora": "x"}], "base_model": "b"}, "lora"),
    ({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]},
                                         {"sources": [{"model": "a", "layer_range": [4, 8]}]}], "base_model": "b"},
     "single slice"),
    ({"merge_method": "linear", "models": ["a", "c"], "base_model": "b"}, "not among them"),
])
def test_unsupported_or_bad_options_are_refused_by_name(cfg, match):
    with pytest.raises((ConfigError, UnknownNameError), match=match):
        plan_from_config(cfg)


def test_full_range_slice_is_models():
    plan = plan_from_config({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3},
                             "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
                                                     {"model": "c", "layer_range": [0, 4]}]}]})
    assert [e.model for e in plan.inputs()] == ["c"] and plan.layer_ranges == {"a": [0, 4], "c": [0, 4]}
