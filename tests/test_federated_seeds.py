"""FedKSeed and Ferret (patchlm.federated.seeds): replay equals direct application, aggregation by hand, Ferret's
unbiased reconstruction, the wire checks, bad input; and two small runs over a real Flower deployment (tampered,
NaN and diverging clients rejected; a restarted server's replay equals an uninterrupted run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from patchlm.federated import seeds
from patchlm.train.zo import Directions


def _cfg(**kw):
    from patchlm.federated.config import FedConfig

    base = {"aggregation": "fedkseed", "seeds": 64, "local_steps": 5, "batch_size": 2, "lr": 1e-3,
            "max_train": 200, "sign": "none", "clients": 2}
    return FedConfig(**{**base, **kw})


# ---------------------------------------------------------------- pure functions
def test_candidate_seeds_are_distinct_recorded_once_and_positive_k():
    a, b = seeds.candidate_seeds(3, 4096), seeds.candidate_seeds(3, 4096)
    assert a == b and len(set(a)) == 4096 and seeds.candidate_seeds(4, 8) != a[:8]
    from patchlm.errors import ConfigError

    with pytest.raises(ConfigError, match="seeds"):
        seeds.candidate_seeds(0, 0)


@pytest.mark.parametrize("scheme", ["lora", "full"])
def test_replay_equals_direct_application(scheme):
    """A client's local FedKSeed steps, replayed from its K per-seed sums, give the model the steps give when
    applied one by one: bit-identical in fp32 against the steps applied in float64 and rounded once, and within
    fp32 rounding of the client's own in-place fp32 model."""
    from patchlm.federated.flower.seed_task import SeedModel, seed_local_train
    from patchlm.federated.flower.task import client_examples, load_fed_task, load_model

    cfg = _cfg(scheme=scheme, seeds=16, local_steps=6)
    sm = SeedModel(load_model(cfg), cfg)
    task = load_fed_task(cfg)
    upd, m = seed_local_train(sm, cfg, 0, 1, client_examples(task, cfg, 0), task, [])
    local = sm.state()
    # the same steps applied directly, one seed at a time, in float64
    g = seeds.from_pairs(upd, cfg.seeds)
    assert m["seeds_used"] == int((g != 0).sum()) >= 1
    cands = seeds.candidate_seeds(cfg.seed, cfg.seeds)
    replayed = seeds.replay(sm.theta0, cfg.seed, seeds.fedkseed_terms(cands, g, cfg.lr))
    names = sorted(sm.theta0)
    dirs = Directions(names, [sm.theta0[n] for n in names], cfg.seed)
    for i, n in enumerate(names):
        direct = sm.theta0[n].double().clone()
        for k in torch.nonzero(g).flatten().tolist():
            direct.add_(dirs.z(i, cands[k], 0).double(), alpha=-cfg.lr * float(g[k]))
        assert torch.equal(replayed[n], direct.float()), n
        assert torch.allclose(replayed[n], local[n], rtol=1e-5, atol=1e-7), n
    assert any(not torch.equal(replayed[n], sm.theta0[n]) for n in names)


def test_local_steps_are_the_per_seed_sums():
    """The rule's recorded (index, g) per step sum to the uploaded K-vector (float32 on the wire)."""
    from patchlm.train.config import TrainConfig
    from patchlm.train.zo import CandidateSeedZO

    p = torch.nn.Parameter(torch.zeros(5))
    target = torch.arange(5.0)
    tcfg = TrainConfig(optimizer="zo-sgd", lr=0.1, zo_eps=1e-3, seed=1, progress=False)
    rule = CandidateSeedZO([p], tcfg, None, candidates=[11, 12, 13], probs=[0.2, 0.3, 0.5], pick_seed=4)

    def closure(backward=False):
        return float(((p.detach() - target) ** 2).sum())

    for _ in range(30):
        rule.step(closure)
    acc = torch.zeros(3, dtype=torch.float64)
    for k, gk in rule.picks:
        acc[k] += gk
    assert len(rule.picks) == 30 and {k for k, _ in rule.picks} == {0, 1, 2}
    replayed = seeds.replay({"param0": torch.zeros(5)}, 1, seeds.fedkseed_terms([11, 12, 13], acc, 0.1))["param0"]
    assert torch.allclose(replayed, p.detach(), atol=1e-6)  # the rule's own in-place fp32 steps
    dirs = Directions(["param0"], [torch.zeros(5)], 1)
    direct = torch.zeros(5, dtype=torch.float64)
    for k, gk in rule.picks:  # step by step, in float64, rounded once: exactly the replayed fp32 model
        direct.add_(dirs.z(0, [11, 12, 13][k], 0).double(), alpha=-0.1 * gk)
    assert torch.equal(direct.float(), replayed)
    assert float(((p.detach() - target) ** 2).sum()) < float((target ** 2).sum())  # the steps descend


def test_aggregation_is_the_weighted_sum_by_hand():
    from patchlm.federated.flower.seed_task import aggregate_update

    cfg = _cfg(seeds=6)
    a = torch.tensor([0.0, 1.5, 0.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.5, 0.0, 0.0, 4.0, 0.0, 1.0], dtype=torch.float64)
    n = [30, 10]
    g = aggregate_update(cfg, [seeds.to_pairs(a), seeds.to_pairs(b)], [x / sum(n) for x in n])
    by_hand = [0.75 * 0.0 + 0.25 * 0.5, 0.75 * 1.5, 0.0, 0.75 * -2.0 + 0.25 * 4.0, 0.0, 0.25 * 1.0]
    assert g["index"].tolist() == [0, 1, 3, 5]
    assert torch.allclose(seeds.from_pairs(g, 6), torch.tensor(by_hand, dtype=torch.float64))
    hist = [g, seeds.to_pairs(torch.tensor([1.0, 0, 0, 0, 0, 0]))]
    assert seeds.cumulative([seeds.from_pairs(h, 6) for h in hist])[0] == pytest.approx(1.125)
    fer = _cfg(aggregation="ferret", ferret_bases=2)
    c1, c2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[-1.0, 0.0], [1.0, 8.0]])
    out = aggregate_update(fer, [{"coefficients": c1}, {"coefficients": c2}], [0.5, 0.5])["coefficients"]
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [2.0, 6.0]]))


def test_ferret_reconstruction_is_unbiased_and_the_official_one_is_not():
    """Averaged over many shared-seed bases, (1/n) sum_j <delta, z_j> z_j comes back to delta (ours); the official
    form (bases uniform on +-1/sqrt(d), coefficients scaled by d / n) comes back to about delta / 3."""
    d, n, m = 12, 2, 4000
    delta = torch.linspace(-1.0, 2.0, d)
    rounds = []
    for r in range(1, m + 1):
        c = seeds.ferret_project({"w": delta}, 5, seeds.ferret_key(5, r), n)
        rounds.append(c)
    total = seeds.replay({"w": torch.zeros(d)}, 5, seeds.ferret_terms(5, rounds))["w"].double()
    mean = total / m
    std = math.sqrt(float((delta ** 2).sum()) * 2 / (n * m))  # per coordinate, generous: (||delta||^2 + d_i^2)/n
    assert float((mean - delta.double()).abs().max()) < 4 * std
    g = torch.Generator().manual_seed(0)
    off = torch.zeros(d, dtype=torch.float64)
    for _ in range(m):
        u = (torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
        off += (d / n) * (u @ delta.double()) @ u
    ratio = float((off / m) @ delta.double() / (delta.double() @ delta.double()))
    assert 0.25 < ratio < 0.42  # about 1/3: biased


def test_seed_probabilities_pro_is_bounded_and_uniform_is_none():
    h = [torch.tensor([0.0, 1.0, -4.0, 0.0]), torch.tensor([2.0, 0.0, 0.0, 0.0])]
    assert seeds.seed_probabilities(h, "uniform") is None and seeds.seed_probabilities([], "pro") is None
    p = seeds.seed_probabilities(h, "pro")
    assert sum(p) == pytest.approx(1.0) and max(p) / min(p) <= math.e + 1e-9
    assert p[2] == max(p) and p[1] == min(p)  # the largest mean |G|, the smallest


def test_wire_checks_reject_bad_scalars_with_the_reason():
    good = seeds.to_pairs(torch.tensor([0.0, 2.0, 0.0, -1.0]))
    assert seeds.check_pairs(good, 4) is None
    nan = {"index": good["index"], "value": torch.tensor([float("nan"), 1.0])}
    assert "non-finite seed scalar" in seeds.check_pairs(nan, 4)
    inf = {"index": good["index"], "value": torch.tensor([1.0, float("inf")])}
    assert "non-finite" in seeds.check_pairs(inf, 4)
    assert "out of range" in seeds.check_pairs({"index": torch.tensor([1, 9], dtype=torch.int32),
                                                "value": torch.ones(2)}, 4)
    assert "increasing" in seeds.check_pairs({"index": torch.tensor([3, 3], dtype=torch.int32),
                                              "value": torch.ones(2)}, 4)
    assert "int32" in seeds.check_pairs({"index": good["index"].long(), "value": good["value"]}, 4)
    bad = torch.zeros(3, 2)
    bad[1, 1] = float("nan")
    assert "tensor 1, basis 1" in seeds.check_coefficients(bad, (3, 2))
    assert "shape" in seeds.check_coefficients(torch.zeros(3, 3), (3, 2))


def test_replay_is_device_and_round_count_independent():
    """G cumulative since round 0: replaying rounds one by one or their sum at once is the same model."""
    theta0 = {"a": torch.randn(7, generator=torch.Generator().manual_seed(1)), "b": torch.zeros(2, 3)}
    cands = seeds.candidate_seeds(0, 8)
    rounds = [torch.tensor([0, 1.0, 0, 0, 2.0, 0, 0, 0]), torch.tensor([0, -0.5, 0, 0, 0, 0, 0, 3.0])]
    once = seeds.replay(theta0, 0, seeds.fedkseed_terms(cands, seeds.cumulative(rounds), 0.01))
    again = seeds.replay(theta0, 0, seeds.fedkseed_terms(cands, rounds[0].double() + rounds[1].double(), 0.01))
    assert all(torch.equal(once[k], again[k]) for k in theta0)
    assert seeds.draws(theta0, seeds.fedkseed_terms(cands, seeds.cumulative(rounds), 0.01)) == 3 * 13


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [(["--aggregation", "fedkseed", "--seeds", "0"], "seeds (K) must be positive"),
             (["--aggregation", "fedkseed", "--seeds", "-3"], "(option --seeds)"),
             (["--aggregation", "fedkseed", "--dp"], "dp is not supported with aggregation fedkseed"),
             (["--aggregation", "ferret", "--dp"], "dp is not supported with aggregation ferret"),
             (["--aggregation", "ferret", "--scheme", "half"], "unknown scheme 'half'"),
             (["--aggregation", "fedkseed", "--seed-probability", "best"], "unknown seed_probability"),
             (["--aggregation", "fedkseed", "--zo-eps", "0"], "zo_eps must be positive"),
             (["--aggregation", "ferret", "--ferret-bases", "0"], "ferret_bases must be in 1..4096"),
             (["--aggregation", "fedkseed", "--clients", "2", "--ranks", "4,2"], "same rank"),
             (["--aggregation", "fedkseed", "--protocol", "continue"], "protocol continue does not apply")]
    for argv, want in cases:
        code, _, err = run_cli(["federate", *argv, "--out", str(out)], capsys)
        assert code == 2 and want in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not out.exists()
    code, _, err = run_cli(["federate", "rebuild", str(tmp_path / "none"), "--round", "1", "--out",
                            str(tmp_path / "p")], capsys)
    assert code == 2 and "not a federated run directory" in err and not (tmp_path / "p").exists()


def test_rebuild_of_a_lora_run_stacks_its_global_rounds(tmp_path, capsys):
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.task import init_lora_tensors, load_model, write_json
    from patchlm.federated.rules import stack_rounds
    from patchlm.patch import Patch

    run = tmp_path / "run"
    cfg = FedConfig(aggregation="flora", clients=2, ranks=[2], run_id="r1", out=str(run))
    write_json(run / "federate.json", cfg.to_dict())
    write_json(run / "state.json", {"completed_round": 2, "run_id": "r1"})
    base = load_model(cfg)
    rounds = []
    for r in (1, 2):
        t = init_lora_tensors(base.model, cfg.targets, 2, r)
        t = {k: v + 0.01 * r if k.endswith("lora_B") else v for k, v in t.items()}
        Patch("lora", base.ref(), {"r": 2, "alpha": 1.0, "scaling": 1.0, "dropout": 0.0,
                                   "targets": sorted({k.rsplit(".", 1)[0] for k in t})}, t
              ).save(run / f"round-{r}" / "global" / "patch")
        rounds.append(t)
    code, _, err = run_cli(["federate", "rebuild", str(run), "--round", "2", "--out", str(tmp_path / "p2")], capsys)
    assert code == 0, err
    got, want = Patch.load(tmp_path / "p2").tensors, stack_rounds(rounds)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    code, _, err = run_cli(["federate", "rebuild", str(run), "--round", "0", "--out", str(tmp_path / "p0")], capsys)
    assert code == 2 and "round 0 of a LoRA run is the base" in err and not (tmp_path / "p0").exists()
    code, _, err = run_cli(["federate", "rebuild", str(run), "--round", "2", "--out", str(tmp_path / "p2")], capsys)
    assert code == 2 and "--force" in err


# ---------------------------------------------------------------- over a real Flower deployment
def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(400)
def test_fedkseed_flower_rejects_tampered_nan_and_diverged_clients(tmp_path, capsys):
    from patchlm.federated.flower.run import federate
    from patchlm.federated.flower.seed_task import aggregate_update, global_record
    from patchlm.train.checkpoint import load_state

    out = tmp_path / "fk"
    cfg = _cfg(clients=4, rounds=2, seeds=128, local_steps=3, eval_limit=8, sign="mldsa", min_clients=1,
               partition="iid", straggler_timeout=60, round_timeout=200)
    s = federate(cfg, out, faults={1: "tamper@1", 2: "nan@1", 3: "diverge@2"}, timeout=380)
    assert s["leftover_processes"] == []
    recs = {r["round"]: r for r in _log(out) if r["event"] == "round"}
    why1 = {x.get("client_id"): x["reason"] for x in recs[1]["rejected"]}
    assert "bad signature" in why1["client-1"] and "non-finite seed scalar" in why1["client-2"]
    assert [c["client_id"] for c in recs[1]["clients"]] == ["client-0", "client-3"]
    why2 = {x.get("client_id"): x["reason"] for x in recs[2]["rejected"]}
    assert list(why2) == ["client-3"] and "replay diverged" in why2["client-3"]
    for r in (1, 2):  # every accepted client replayed the server's model of the previous round
        assert all(c["model_hash"] == recs[r - 1]["model_hash"] for c in recs[r]["clients"])
        per_client = sum(c["bytes_up"] + c["bytes_down"] for c in recs[r]["clients"]) / len(recs[r]["clients"])
        assert 0 < per_client < 18_000  # K = 128: kilobytes, signatures included
    # audit: re-aggregating the saved client updates gives the saved global update
    ups = [load_state(out / "round-2" / f"client-{k}", "update") for k in (0, 1, 2)]
    n = [u["meta"]["num_samples"] for u in ups]
    again = aggregate_update(cfg, [u["update"] for u in ups], [x / sum(n) for x in n])
    saved = global_record(out, 2)["update"]
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    fin = next(r for r in _log(out) if r["event"] == "final_check")
    assert fin["hashes_match"] and fin["server_hash"] == recs[2]["model_hash"]
    assert len(json.loads((out / "seeds.json").read_text())["candidates"]) == 128
    # the model of round 1 as a patch: its replay hash is the one the run recorded
    code, stdout, err = run_cli(["federate", "rebuild", str(out), "--round", "1", "--out", str(tmp_path / "r1"),
                                 "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["kind"] == "lora" and info["model_hash"] == recs[1]["model_hash"]
    code, _, err = run_cli(["federate", "rebuild", str(out), "--round", "5", "--out", str(tmp_path / "r5")], capsys)
    assert code == 2 and "round must be in 0..2" in err


@pytest.mark.timeout(500)
def test_ferret_restarted_server_replays_as_an_uninterrupted_run(tmp_path, monkeypatch):
    from patchlm.errors import PatchlmError
    from patchlm.federated.flower.run import federate
    from patchlm.patch import Patch

    cfg = {"aggregation": "ferret", "scheme": "full", "ferret_bases": 4, "clients": 2, "rounds": 2,
           "local_steps": 2, "batch_size": 2, "lr": 1e-3, "max_train": 200, "eval_limit": 8, "sign": "none"}
    a, b = tmp_path / "crash", tmp_path / "straight"
    monkeypatch.setenv("PATCHLM_FED_CRASH_AFTER_ROUND", "1")
    with pytest.raises(PatchlmError, match="injected server crash after round 1"):
        federate(_cfg(**cfg), a, timeout=240)
    monkeypatch.delenv("PATCHLM_FED_CRASH_AFTER_ROUND")
    federate(_cfg(**cfg), a, resume=True, timeout=240)
    federate(_cfg(**cfg), b, timeout=240)
    la, lb = _log(a), _log(b)
    res = next(r for r in la if r["event"] == "resume")
    assert res["completed_round"] == 1 and res["replay_matches_saved_hash"]
    ha = [r["model_hash"] for r in la if r["event"] == "round" and r["round"] > 0]
    hb = [r["model_hash"] for r in lb if r["event"] == "round" and r["round"] > 0]
    assert ha == hb and len(ha) == 2
    assert all(next(r for r in x if r["event"] == "final_check")["hashes_match"] for x in (la, lb))
    pa, pb = Patch.load(a / "final" / "patch"), Patch.load(b / "final" / "patch")
    assert pa.kind == "merged" and all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pb.tensors)
