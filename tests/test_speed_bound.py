"""The MindSkip prefill speed bound: the FLOP count against torch's own counter on a tiny model, the score
products by hand, the bound and its interpolation by closed form, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from patchlm.depth.runtime import apply_drops, restore_drops
from patchlm.depth.skip import prefill_flops, speed_bound, speedup_at
from patchlm.errors import ConfigError


def _mm_flops(model, ids) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return fc.get_total_flops()


def _scores(c, batch: int, t: int) -> float:
    """q.k and p.v over the causal triangle: 2 products x 2 FLOPs x heads x head_dim x t(t+1)/2, per sequence."""
    hd = c.hidden_size // c.num_attention_heads
    return batch * 2 * 2 * c.num_attention_heads * hd * t * (t + 1) / 2


def test_projection_mlp_and_head_flops_equal_torchs_counter(tiny):
    c, b, t = tiny.model.config, 2, 16
    ids = torch.randint(0, c.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    f = prefill_flops(c, t, b, logits_to_keep=1)
    n = c.num_hidden_layers
    # FlopCounterMode counts the linear layers (aten.mm), not the SDPA score products on CPU
    assert _mm_flops(tiny.model, ids) == f["total"] - n * _scores(c, b, t)
    routed = list(range(1, n))
    apply_drops(tiny.model, routed, [])
    try:
        skipped = _mm_flops(tiny.model, ids)
    finally:
        restore_drops(tiny.model)
    assert skipped == f["total"] - n * _scores(c, b, t) - len(routed) * (f["attention_per_layer"] - _scores(c, b, t))


def test_bound_closed_form():
    c = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=4, vocab_size=10, num_hidden_layers=3)
    f = prefill_flops(c, seq_len=3, batch=1, logits_to_keep=1)
    proj = 8 * 8 * 2 + 8 * 4 * 2           # q, o: 8x8; k, v: 8x4
    assert f["attention_per_layer"] == 2 * (3 * proj + 2 * 2 * 4 * 6)  # 6 = 1+2+3 keys over the triangle
    assert f["mlp_per_layer"] == 2 * 3 * 3 * 8 * 16
    assert f["head"] == 2 * 8 * 10
    assert prefill_flops(c, 3, 1, None)["head"] == 3 * 2 * 8 * 10
    total = 3 * (f["attention_per_layer"] + f["mlp_per_layer"]) + f["head"]
    sb = speed_bound(c, [1, 2], 3)
    assert sb["bound"] == pytest.approx(total / (total - 2 * f["attention_per_layer"]))
    assert sb["head_share"] == pytest.approx(f["head"] / total)
    assert speedup_at(sb["bound"], 1.0) == pytest.approx(1.0)
    assert speedup_at(sb["bound"], 0.0) == pytest.approx(sb["bound"])
    # half the routed attentions skipped saves half the time the bound saves
    half = speedup_at(sb["bound"], 0.5)
    assert 1 / half == pytest.approx(1 - 0.5 * (1 - 1 / sb["bound"]))


def test_bound_bad_input():
    c = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                        vocab_size=10, num_hidden_layers=3)
    with pytest.raises(ConfigError, match="out of range"):
        speed_bound(c, [3], 4)
    with pytest.raises(ConfigError, match="executed fraction"):
        speedup_at(1.2, 1.5)
