"""Aggregation rules: exactness identity for random ranks and data sizes, hand-computed cases, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from patchlm.errors import ConfigError, PatchFormatError
from patchlm.federated.rules import (
    ClientUpdate,
    aggregate,
    aggregation_error,
    fedit,
    ffa,
    flora,
    merge_tensors_into_model,
    stack_rounds,
    update_from_patch,
    zeropad,
)


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def upd(mods, scaling, n, cid=""):
    return ClientUpdate({k: (T(a), T(b)) for k, (a, b) in mods.items()}, scaling, n, cid)


def dense(g, name="m"):
    return g.delta(name).float()


@pytest.mark.parametrize("seed", range(5))
def test_flora_exact_for_random_ranks_sizes_and_alphas(seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    k = rnd.randint(2, 6)
    shapes = {"a.q": (7, 5), "a.v": (3, 5), "b.up": (9, 4)}
    ups = []
    for i in range(k):
        r = rnd.choice([1, 2, 3, 4, 8])
        alpha = rnd.choice([1.0, 4.0, 16.0, 2.0 * r])
        mods = {n: (torch.randn(r, din, generator=gen), torch.randn(dout, r, generator=gen))
                for n, (dout, din) in shapes.items()}
        ups.append(ClientUpdate(mods, alpha / r, rnd.randint(1, 1000), f"c{i}"))
    g = flora(ups)
    assert aggregation_error(g, ups) < 1e-12
    assert g.rank["a.q"] == sum(u.modules["a.q"][0].shape[0] for u in ups)
    # the saved (float32) tensors still meet the 1e-6 goal
    from patchlm.federated.rules import GlobalLoRA
    g32 = GlobalLoRA({n: (a.float(), b.float()) for n, (a, b) in g.modules.items()}, "flora")
    assert aggregation_error(g32, ups) < 1e-6
    # same ranks: fedit is inexact on random adapters
    same = [ClientUpdate({n: (torch.randn(4, d[1], generator=gen), torch.randn(d[0], 4, generator=gen))
                          for n, d in shapes.items()}, 2.0, rnd.randint(1, 100)) for _ in range(3)]
    assert aggregation_error(flora(same), same) < 1e-12
    assert aggregation_error(fedit(same), same) > 0.1


def two_clients_rank1():
    c1 = upd({"m": ([[1, 0]], [[1], [0]])}, 1.0, 1, "c1")   # dW1 = [[1,0],[0,0]]
    c2 = upd({"m": ([[0, 1]], [[0], [1]])}, 2.0, 3, "c2")   # dW2 = [[0,0],[0,2]]
    return [c1, c2]


def test_flora_hand_computed():
    g = flora(two_clients_rank1())
    a, b = g.modules["m"]
    assert torch.allclose(a.float(), T([[0.25, 0], [0, 1.5]]))
    assert torch.allclose(b.float(), T([[1, 0], [0, 1]]))
    assert torch.allclose(dense(g), T([[0.25, 0], [0, 1.5]]))
    assert g.weights == [0.25, 0.75]


def test_fedit_hand_computed_and_its_error():
    ups = two_clients_rank1()
    g = fedit(ups)
    assert torch.allclose(dense(g), T([[0.0625, 0.1875], [0.375, 1.125]]))
    # ||diff||^2 = 2*0.1875^2 + 2*0.375^2 = 0.3515625; ||ideal||^2 = 0.25^2 + 1.5^2 = 2.3125
    assert aggregation_error(g, ups) == pytest.approx((0.3515625 / 2.3125) ** 0.5, rel=1e-9)
    assert aggregation_error(flora(ups), ups) == 0.0


def test_fedit_refuses_mixed_ranks():
    c1 = upd({"m": ([[1, 0], [0, 1]], [[1, 0], [0, 1]])}, 0.5, 1)
    c2 = upd({"m": ([[0, 1]], [[0], [1]])}, 2.0, 3)
    with pytest.raises(ConfigError, match="mixed ranks"):
        fedit([c1, c2])


def test_zeropad_hand_computed():
    c1 = upd({"m": ([[1, 0], [0, 1]], [[1, 0], [0, 1]])}, 0.5, 1)   # r=2, dW1 = 0.5 I
    c2 = upd({"m": ([[0, 1]], [[0], [1]])}, 2.0, 3)                 # r=1, dW2 = [[0,0],[0,2]]
    g = zeropad([c1, c2])
    a, b = g.modules["m"]
    assert torch.allclose(a.float(), T([[0.25, 0.75], [0, 0.25]]))
    assert torch.allclose(b.float(), T([[0.125, 0], [1.5, 0.125]]))
    assert torch.allclose(dense(g), T([[0.03125, 0.09375], [0.375, 1.15625]]))
    assert aggregation_error(g, [c1, c2]) > 0.1


def test_ffa_hand_computed_exact_with_shared_a():
    c1 = upd({"m": ([[1, 0], [0, 1]], [[1, 0], [0, 1]])}, 0.5, 1)   # A = I (r=2)
    c2 = upd({"m": ([[1, 0]], [[0], [1]])}, 2.0, 3)                 # A = first row of I (r=1)
    g = ffa([c1, c2])
    assert torch.allclose(dense(g), T([[0.125, 0], [1.5, 0.125]]))
    assert aggregation_error(g, [c1, c2]) < 1e-15


def test_ffa_refuses_unshared_a():
    c1 = upd({"m": ([[1, 0]], [[1], [0]])}, 1.0, 1)
    c2 = upd({"m": ([[0, 1]], [[0], [1]])}, 1.0, 1)
    with pytest.raises(ConfigError, match="shared frozen A"):
        ffa([c1, c2])


def test_bad_updates_rejected():
    c1 = upd({"m": ([[1, 0]], [[1], [0]])}, 1.0, 1)
    c2 = upd({"x": ([[1, 0]], [[1], [0]])}, 1.0, 1)
    with pytest.raises(PatchFormatError, match="other modules"):
        flora([c1, c2])
    c3 = upd({"m": ([[1, 0, 0]], [[1], [0]])}, 1.0, 1)
    with pytest.raises(PatchFormatError, match="shape"):
        flora([c1, c3])
    with pytest.raises(ConfigError):
        aggregate("flora", [])
    from patchlm.errors import UnknownNameError
    with pytest.raises(UnknownNameError, match="flora"):
        aggregate("florra", [c1])


def test_merge_and_stack_rounds_match(tiny):
    """Merging two rounds' global updates equals merging their stacked concatenation."""
    model = tiny.model
    name = "model.layers.0.self_attn.q_proj"
    w0 = model.get_submodule(name).weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    r1 = {f"{name}.lora_A": torch.randn(3, 64, generator=gen), f"{name}.lora_B": torch.randn(64, 3, generator=gen)}
    r2 = {f"{name}.lora_A": torch.randn(2, 64, generator=gen), f"{name}.lora_B": torch.randn(64, 2, generator=gen)}
    merge_tensors_into_model(model, r1)
    merge_tensors_into_model(model, r2)
    both = model.get_submodule(name).weight.detach().clone()
    st = stack_rounds([r1, r2])
    assert st[f"{name}.lora_A"].shape == (5, 64)
    expect = w0 + st[f"{name}.lora_B"] @ st[f"{name}.lora_A"]
    assert torch.allclose(both, expect, atol=1e-5)


def test_update_from_patch_reads_num_samples(tiny):
    from patchlm.patch import Patch

    name = "model.layers.0.self_attn.q_proj"
    p = Patch("lora", tiny.ref(), {"r": 2, "alpha": 8}, {f"{name}.lora_A": torch.ones(2, 64),
                                                         f"{name}.lora_B": torch.ones(64, 2)},
              metrics={"num_samples": 17})
    u = update_from_patch(p)
    assert u.num_samples == 17 and u.scaling == 4.0


def test_lora_from_global_keeps_the_product_and_truncates():
    from patchlm.federated.flower.task import lora_from_global

    g = {"m.lora_A": torch.randn(4, 6), "m.lora_B": torch.randn(5, 4)}
    full = lora_from_global(g, 4, scaling=2.0)
    assert torch.allclose(full["m.lora_B"] @ full["m.lora_A"] * 2.0, g["m.lora_B"] @ g["m.lora_A"], atol=1e-5)
    part = lora_from_global(g, 2, scaling=1.0)
    assert torch.equal(part["m.lora_A"], g["m.lora_A"][:2]) and torch.equal(part["m.lora_B"], g["m.lora_B"][:, :2])
    with pytest.raises(ValueError, match="rank 4 < the client's rank 8"):
        lora_from_global(g, 8, scaling=1.0)
