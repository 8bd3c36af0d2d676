"""Client-side DP (Opacus) on LoRA adapters, DP-Flat, client partitions, and the server's update checks."""

from __future__ import annotations

import pytest
import torch
from conftest import attach_lora, toy_features

from patchlm.errors import ConfigError, DataError


def test_dp_changes_adapter_weights_and_reports_epsilon(tiny, toy_task):
    from patchlm.federated.privacy import DPConfig, dp_train

    params, _ = attach_lora(tiny)
    before = [p.detach().clone() for p in params]
    feats = toy_features(tiny, toy_task)
    torch.manual_seed(0)
    rec = dp_train(tiny.model, params, feats, tiny.tokenizer.pad_token_id, steps=4, batch_size=8, lr=1e-2,
                   dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), seed=0)
    # every adapter tensor moved, including B, which starts at zero (the Opacus + PEFT pitfall leaves it frozen)
    for p, b in zip(params, before, strict=True):
        assert not torch.equal(p.detach(), b)
    assert all(float(p.abs().max()) > 0 for p, b in zip(params, before, strict=True) if not b.any())
    assert 0 < rec["epsilon"] < float("inf") and rec["sample_rate"] == pytest.approx(8 / 32)
    assert rec["delta"] == pytest.approx(1 / 32 ** 1.1)
    # no hooks left behind: ordinary training works on the model afterwards
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)


def test_dp_gradient_equals_plain_gradient_without_noise_or_clipping(tiny, toy_task):
    """With sigma=0, C huge and q=1 (whole data every step), the DP-SGD gradient is the plain mean gradient:
    checks Opacus's per-example gradients through patchlm's LoraLinear (functorch path)."""
    from patchlm.data.features import collate
    from patchlm.federated.privacy import DPConfig, dp_train
    from patchlm.train.engine import per_example_loss

    params, _ = attach_lora(tiny)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    feats = toy_features(tiny, toy_task)[:6]
    batch = collate(feats, tiny.tokenizer.pad_token_id)
    loss = per_example_loss(tiny.model, batch).mean()
    plain = torch.autograd.grad(loss, params)
    start = [p.detach().clone() for p in params]
    lr = 1e-3
    dp_train(tiny.model, params, feats, tiny.tokenizer.pad_token_id, steps=1, batch_size=6, lr=lr,
             dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e6), seed=0)
    # first AdamW step: update = -lr * g / (|g| + eps) elementwise, so sign(update) = -sign(g) where g is not tiny
    for p, s, g in zip(params, start, plain, strict=True):
        step = (p.detach() - s)
        big = g.abs() > 1e-6
        assert big.any()
        assert torch.equal(torch.sign(step[big]), -torch.sign(g[big]))
        assert torch.allclose(step[big].abs(), torch.full_like(step[big], lr), rtol=1e-2)


def test_total_epsilon_composes_rounds():
    from patchlm.federated.privacy import total_epsilon

    one = total_epsilon([(1.0, 0.1, 10)], 1e-5)
    two = total_epsilon([(1.0, 0.1, 10), (1.0, 0.1, 10)], 1e-5)
    assert two == pytest.approx(total_epsilon([(1.0, 0.1, 20)], 1e-5))
    assert one < two < 2 * one
    assert total_epsilon([], 1e-5) == 0.0
    assert total_epsilon([(2.0, 0.1, 10)], 1e-5) < one  # more noise, less privacy loss


@pytest.mark.parametrize("noise,rate,steps,delta", [(1.0, 0.25, 4, 1e-5), (0.8, 0.01, 1000, 1e-5),
                                                    (2.0, 0.1, 200, 1e-6)])
def test_epsilon_agrees_with_opacus_accountant(noise, rate, steps, delta):
    """total_epsilon against Opacus's RDP accountant stepped one optimizer step at a time, and Opacus's inverse
    (get_noise_multiplier) gives back the noise that reaches that epsilon."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from patchlm.federated.privacy import total_epsilon

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    eps = total_epsilon([(noise, rate, steps)], delta)
    assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert 0 < eps < float("inf")
    sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=rate, steps=steps,
                                 accountant="rdp", epsilon_tolerance=0.001)
    assert sigma == pytest.approx(noise, rel=0.02)
    # split into rounds, the composition is the same
    assert total_epsilon([(noise, rate, steps // 2), (noise, rate, steps - steps // 2)], delta) == pytest.approx(eps)


def test_dp_train_reports_the_accountants_epsilon(tiny, toy_task):
    """dp_train's epsilon is Opacus's RDP epsilon for (noise, q = batch / n, steps, delta), empty batches included."""
    from opacus.accountants import RDPAccountant

    from patchlm.federated.privacy import DPConfig, dp_train

    params, _ = attach_lora(tiny)
    feats = toy_features(tiny, toy_task)
    rec = dp_train(tiny.model, params, feats, tiny.tokenizer.pad_token_id, steps=5, batch_size=2, lr=1e-2,
                   dp=DPConfig(noise_multiplier=1.3, max_grad_norm=1.0, delta=1e-5), seed=0)
    acc = RDPAccountant()
    acc.history = [(1.3, 2 / 32, 5)]
    assert rec["sample_rate"] == 2 / 32 and rec["steps"] == 5 and rec["delta"] == 1e-5
    assert rec["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_dp_config_errors_name_the_field():
    from patchlm.federated.config import FedConfig
    from patchlm.federated.privacy import DPConfig

    with pytest.raises(ConfigError, match="noise_multiplier must be >= 0") as e:
        DPConfig(noise_multiplier=-1)
    assert e.value.field == "noise_multiplier"
    with pytest.raises(ConfigError, match=r"^dp_clip must be positive") as e:  # FedConfig names its own field
        FedConfig(dp=True, dp_clip=0)
    assert e.value.field == "dp_clip"
    with pytest.raises(ConfigError, match=r"^dp_delta must be in \(0, 1\)") as e:
        FedConfig(dp=True, dp_delta=2.0)
    assert e.value.field == "dp_delta"
    # FedConfig's dp_* defaults are DPConfig's
    assert FedConfig().dp_config() == DPConfig()


def test_flatness_choice_sees_the_perturbations_under_bf16(toy_task):
    """Regression: autocast caches its bf16 copies of the float32 adapter until its context exits, so scoring all
    perturbed losses in one context gave every layer a sharpness change of exactly 0 under bf16 (and the choice
    fell back to the first layers in module order). Each loss now has its own context: bf16 ranks as float32."""
    from patchlm.federated.privacy import DPConfig, dp_train
    from patchlm.models import load_base

    recs = {}
    for bf16 in (False, True):
        base = load_base("tiny-random-llama")
        params, mods = attach_lora(base)
        feats = toy_features(base, toy_task)
        torch.manual_seed(0)
        recs[bf16] = dp_train(base.model, params, feats, base.tokenizer.pad_token_id, steps=2, batch_size=8,
                              lr=1e-2, dp=DPConfig(noise_multiplier=1.0, flat=True, flat_parts="layers",
                                                   teacher_steps=5), seed=0, lora_modules=mods,
                              public_feats=feats[:8], bf16=bf16)
    s16, s32 = recs[True]["layer_sharpness_change"], recs[False]["layer_sharpness_change"]
    assert len(set(s16.values())) == len(s16) == 4  # distinct scores, not a tie of zeros
    assert recs[True]["kept_layers"] == recs[False]["kept_layers"]
    assert sorted(s16, key=s16.get) == sorted(s32, key=s32.get)


def test_flatness_choice_is_scored_in_float32_under_bf16_training(toy_task):
    """The layer scores are loss differences of a few 1e-3, at bf16's resolution: dp_train scores them in float32
    even when it trains under bf16. Its record equals a float32 scoring of the same (bf16-trained) teacher and
    differs from a bf16 scoring of it."""
    from contextlib import nullcontext

    from patchlm.data.features import collate
    from patchlm.federated.privacy import DPConfig, dp_train, flatness_layer_choice, train_public_teacher
    from patchlm.models import load_base
    from patchlm.train.engine import autocast

    def setup():
        base = load_base("tiny-random-llama")
        params, mods = attach_lora(base)
        return base, params, mods, toy_features(base, toy_task)

    base, params, mods, feats = setup()
    torch.manual_seed(0)
    rec = dp_train(base.model, params, feats, base.tokenizer.pad_token_id, steps=1, batch_size=8, lr=1e-2,
                   dp=DPConfig(noise_multiplier=1.0, flat=True, flat_parts="layers", teacher_steps=5), seed=0,
                   lora_modules=mods, public_feats=feats[:8], bf16=True)
    assert rec["flat_score_dtype"] == "float32"
    base, params, mods, feats = setup()  # the same teacher again, scored both ways
    train_public_teacher(base.model, params, feats[:8], base.tokenizer.pad_token_id, 5, 8, 1e-2, 0, True)
    batch = collate(feats[:8], base.tokenizer.pad_token_id)
    f32: dict[str, float] = {}
    b16: dict[str, float] = {}
    flatness_layer_choice(base.model, mods, batch, 0.5, 0, nullcontext, scores=f32)
    flatness_layer_choice(base.model, mods, batch, 0.5, 0, lambda: autocast("cpu", True), scores=b16)
    assert rec["layer_sharpness_change"] == f32
    assert b16 != f32


def test_flatness_scores_are_paired_per_draw_estimates_whose_mean_is_the_choice_key(tiny, toy_task):
    from contextlib import nullcontext

    from patchlm.data.features import collate
    from patchlm.federated.privacy import flatness_layer_choice, flatness_scores

    params, mods = attach_lora(tiny)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(0, 0.5)  # a trained-looking adapter: removing a layer's part changes the loss
    before = [p.detach().clone() for p in params]
    batch = collate(toy_features(tiny, toy_task)[:8], tiny.tokenizer.pad_token_id)
    per = flatness_scores(tiny.model, mods, batch, seed=1, amp=nullcontext, draws=4)
    assert sorted(per) == [f"model.layers.{i}" for i in range(4)] and all(len(v) == 4 for v in per.values())
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))  # every move undone exactly
    assert len({x for v in per.values() for x in v}) == 16  # each draw its own estimate
    two = flatness_scores(tiny.model, mods, batch, seed=1, amp=nullcontext, draws=2)
    for lay, v in two.items():  # the same seed gives the same first draws: a run with more draws extends it
        assert v == pytest.approx(per[lay][:2], abs=1e-12)
    key: dict[str, float] = {}
    kept = flatness_layer_choice(tiny.model, mods, batch, 0.5, seed=1, amp=nullcontext, draws=4, scores=key)
    assert key == pytest.approx({lay: sum(v) / 4 for lay, v in per.items()}, abs=1e-12)
    assert kept == sorted(sorted(key, key=lambda lay: -key[lay])[:2])


def test_dp_flat_keeps_chosen_layers_and_stays_private(tiny, toy_task):
    from patchlm.federated.privacy import DPConfig, _layer_of, dp_train

    params, mods = attach_lora(tiny)
    feats = toy_features(tiny, toy_task)
    torch.manual_seed(0)
    rec = dp_train(tiny.model, params, feats, tiny.tokenizer.pad_token_id, steps=4, batch_size=8, lr=1e-2,
                   dp=DPConfig(noise_multiplier=1.0, flat=True, flat_keep=0.5, teacher_steps=2), seed=0,
                   lora_modules=mods, public_feats=feats[:8])
    assert rec["flat"] and len(rec["kept_layers"]) == 2 and rec["num_layers"] == 4
    scores = rec["layer_sharpness_change"]  # the kept layers are the two whose removal sharpens the loss most
    assert len(scores) == 4 and set(rec["kept_layers"]) == set(sorted(scores, key=lambda k: -scores[k])[:2])
    for name, m in mods.items():
        if _layer_of(name) in rec["kept_layers"]:
            assert m.lora_B.abs().max() > 0
        else:
            assert m.lora_B.abs().max() == 0  # dropped layers: no update, no noise spent
    assert 0 < rec["epsilon"] < float("inf")
    with pytest.raises(ConfigError, match="public data"):
        dp_train(tiny.model, params, feats, 0, steps=1, batch_size=8, lr=1e-2, dp=DPConfig(flat=True))


def test_random_layer_choice_is_the_control_with_as_many_layers(tiny, toy_task):
    from patchlm.federated.privacy import DPConfig, random_layer_choice

    layers = [f"model.layers.{i}" for i in range(30)]
    a = random_layer_choice(layers, 0.5, seed=3)
    assert len(a) == 15 and set(a) <= set(layers) and a == sorted(a)
    assert a == random_layer_choice(list(reversed(layers)), 0.5, seed=3)  # a function of the seed, not the order
    assert a != random_layer_choice(layers, 0.5, seed=4)
    assert len(random_layer_choice(layers, 0.01, seed=0)) == 1
    rand, _ = _dp_run(tiny, toy_task, "layers", flat_choice="random")
    assert len(rand["kept_layers"]) == 2 and "layer_sharpness_change" not in rand  # no flatness scores computed
    with pytest.raises(ConfigError, match="flat_choice 'flatnes' is unknown; did you mean flatness") as e:
        DPConfig(flat_choice="flatnes")
    assert e.value.field == "flat_choice"


def test_dirichlet_partition_hand_checks():
    from patchlm.data.task import Task
    from patchlm.federated.flower.task import partition_indices

    ex = [{"text": f"t{i}", "label": i % 3} for i in range(300)]
    task = Task(name="t", kind="classification", train=ex, validation=[], test=[], labels=["a", "b", "c"],
                verbalizers=[" a", " b", " c"])
    parts = partition_indices(task, 4, "dirichlet", 0.5, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(300))                                   # disjoint and complete
    assert parts == partition_indices(task, 4, "dirichlet", 0.5, seed=1)  # deterministic
    # small alpha: skewed label mixes; huge alpha: every client near 1/3 of each label
    skew = [[sum(1 for i in p if ex[i]["label"] == c) / len(p) for c in range(3)] for p in parts]
    assert max(max(s) for s in skew) > 0.5
    even = partition_indices(task, 4, "dirichlet", 1e4, seed=1)
    for p in even:
        assert all(abs(sum(1 for i in p if ex[i]["label"] == c) / len(p) - 1 / 3) < 0.1 for c in range(3))
    iid = partition_indices(task, 3, "iid", seed=0)
    assert [len(p) for p in iid] == [100, 100, 100]
    nat = Task(name="n", kind="text", train=[{"text": "x", "client": c} for c in "aabbbc"], validation=[], test=[])
    assert partition_indices(nat, 2, "natural", min_size=1) == [[2, 3, 4], [0, 1]]
    with pytest.raises(DataError, match="natural clients"):
        partition_indices(nat, 4, "natural", min_size=1)
    with pytest.raises(DataError, match="iid or natural"):
        partition_indices(nat, 2, "dirichlet", min_size=1)


def test_server_checks_shapes_and_nans():
    from patchlm.federated.flower.strategy import _check_tensors

    exp = {"m.lora_A": (8,), "m.lora_B": (6,)}
    good = {"m.lora_A": torch.zeros(2, 8), "m.lora_B": torch.zeros(6, 2)}
    assert _check_tensors(good, exp) is None
    assert "wrong shape" in _check_tensors({**good, "m.lora_A": torch.zeros(2, 9)}, exp)
    assert "wrong shape" in _check_tensors({**good, "m.lora_B": torch.zeros(6, 3)}, exp)
    assert "non-finite" in _check_tensors({**good, "m.lora_B": torch.full((6, 2), float("nan"))}, exp)
    assert "non-finite" in _check_tensors({**good, "m.lora_A": torch.full((2, 8), float("inf"))}, exp)
    assert "wrong tensors" in _check_tensors({"m.lora_A": torch.zeros(2, 8)}, exp)
    assert _check_tensors({}, exp) == "empty update"


def test_ffa_clients_share_a_across_ranks(tiny):
    from patchlm.federated.flower.task import init_lora_tensors

    a8 = init_lora_tensors(tiny.model, "qv", 8, seed=5)
    a2 = init_lora_tensors(tiny.model, "qv", 2, seed=5)
    for k, v in a2.items():
        if k.endswith("lora_A"):
            assert torch.equal(v, a8[k][:2])
        else:
            assert not v.any()


def test_dp_flat_parts_are_canonical_and_bad_ones_name_the_field():
    from patchlm.federated.config import FedConfig
    from patchlm.federated.privacy import DPConfig

    assert DPConfig(flat=True, flat_parts="distill, minmax").flat_parts == "minmax,distill"
    assert DPConfig(flat=True, flat_parts="layers").has("layers") and not DPConfig(flat_parts="layers").has("layers")
    with pytest.raises(ConfigError, match="flat_parts must be") as e:
        DPConfig(flat_parts="minmax,sam")
    assert e.value.field == "flat_parts"
    with pytest.raises(ConfigError, match=r"^dp_flat_parts must be") as e:
        FedConfig(dp=True, dp_flat=True, dp_flat_parts="")
    assert e.value.field == "dp_flat_parts"


def _dp_run(tiny, toy_task, parts, **kw):
    from patchlm.federated.privacy import DPConfig, dp_train

    params, mods = attach_lora(tiny)
    feats = toy_features(tiny, toy_task)
    torch.manual_seed(0)
    dp = DPConfig(noise_multiplier=1.0, flat=parts is not None, flat_parts=parts or "minmax", flat_keep=0.5,
                  teacher_steps=2, flat_warm=1.0, **kw)
    rec = dp_train(tiny.model, params, feats, tiny.tokenizer.pad_token_id, steps=4, batch_size=8, lr=1e-2, dp=dp,
                   seed=0, lora_modules=mods, public_feats=feats[:8] if parts and parts != "minmax" else None)
    from patchlm.adapters.lora import LoraKind

    weights = [p.detach().clone() for p in params]
    LoraKind().detach(tiny.model)  # the next run attaches a fresh adapter to the same base
    return rec, weights


def test_each_dp_flat_part_runs_alone_and_changes_the_training_but_not_the_privacy_cost(tiny, toy_task):
    plain, w_plain = _dp_run(tiny, toy_task, None)
    minmax, w_minmax = _dp_run(tiny, toy_task, "minmax")  # no public data needed: no teacher, no layer choice
    assert "kept_layers" not in minmax and minmax["flat_parts"] == "minmax"
    assert any(not torch.equal(a, b) for a, b in zip(w_plain, w_minmax, strict=True))
    layers, w_layers = _dp_run(tiny, toy_task, "layers")
    assert len(layers["kept_layers"]) == 2 and layers["num_layers"] == 4
    both, w_both = _dp_run(tiny, toy_task, "layers,distill", flat_lambda=10.0)
    assert both["kept_layers"] == layers["kept_layers"]  # the same teacher and the same choice
    assert any(not torch.equal(a, b) for a, b in zip(w_layers, w_both, strict=True))  # distillation acts
    distill, _ = _dp_run(tiny, toy_task, "distill")
    assert len(distill["kept_layers"]) == 4  # distillation alone keeps every layer
    # every part post-processes privatised gradients or uses public data: the same (noise, q, steps), same epsilon
    for rec in (minmax, layers, both, distill):
        assert rec["epsilon"] == pytest.approx(plain["epsilon"], rel=1e-12)
