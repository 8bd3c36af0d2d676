"""Federated runs over a real Flower deployment (SuperLink + SuperNodes on loopback) with tiny-random-llama:
the contract run, every rejection case inside a round, a client that disconnects mid-round, a server restart.
Each run is bounded in time and must leave no process behind."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
from conftest import run_cli

pytestmark = pytest.mark.timeout(300)


def _procs_under(path: Path) -> list[str]:
    """Processes still running from a run directory (the deployment runs with cwd OUT/.flower)."""
    out = []
    for p in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        try:
            cwd = p.info["cwd"] or ""
            if str(path) in cwd and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:80]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_two_clients_two_rounds_over_flower(tmp_path, capsys):
    out = tmp_path / "fed"
    try:
        code, stdout, err = run_cli(["federate", "--model", "tiny-random-llama", "--task", "sms_spam", "--clients", "2",
                                     "--rounds", "2", "--aggregation", "flora", "--ranks", "4,2", "--local-steps", "2",
                                     "--eval-limit", "24", "--max-train", "400", "--timeout", "240", "--out", str(out),
                                     "--json"], capsys)
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["leftover_processes"] == []
        for r in (1, 2):
            for k in (0, 1):
                meta = json.loads((out / f"round-{r}" / f"client-{k}" / "patch" / "patch.json").read_text())
                n = meta["metrics"]["num_samples"]
                assert n > 0 and meta["spec"]["num_samples"] == n
                assert meta["spec"]["r"] == (4, 2)[k]
            assert (out / f"round-{r}" / "global" / "patch" / "patch.json").exists()
        # audit round 2: re-aggregating the saved client patches gives the saved global patch, exactly FLoRA
        from patchlm.federated.rules import aggregation_error, flora, update_from_patch
        from patchlm.patch import Patch

        ups = [update_from_patch(Patch.load(out / "round-2" / f"client-{k}" / "patch"), client_id=f"client-{k}")
               for k in (0, 1)]
        g = flora(ups)
        saved = Patch.load(out / "round-2" / "global" / "patch")
        for n, (a, b) in g.modules.items():
            assert torch.allclose(saved.tensors[f"{n}.lora_A"], a.float(), atol=1e-7)
            assert torch.allclose(saved.tensors[f"{n}.lora_B"], b.float(), atol=1e-7)
        assert aggregation_error(g, ups) < 1e-6
        assert saved.metrics["aggregation_error"] < 1e-6
        rounds = [r for r in _log(out) if r["event"] == "round" and r["round"] > 0]
        assert [r["round"] for r in rounds] == [1, 2]
        for r in rounds:
            assert r["rejected"] == [] and len(r["clients"]) == 2
            assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in r["clients"])
            assert r["sign_seconds_clients"] > 0 and r["bytes_up"] > 0
        # round 2 carries round 1's global
        assert rounds[1]["bytes_down_per_client"] > rounds[0]["bytes_down_per_client"]
        # (the delta broadcast of a third round is checked in test_server_restart_resumes_from_last_completed_round)
        assert all(r["resent_full_history"] == [] for r in rounds)
        for k in (0, 1):  # each client cached the rounds it verified
            cached = sorted(p.name for p in (out / ".flower" / "cache").glob(f"*/client-{k}/round-*.safetensors"))
            assert cached == ["round-1.safetensors"]
        final = Patch.load(out / "final" / "patch")
        name = next(k for k in final.tensors if k.endswith("lora_A"))
        assert final.tensors[name].shape[0] == 2 * (4 + 2)  # two rounds of stacked ranks 4 + 2
    finally:
        assert _procs_under(out) == []


def test_bad_updates_rejected_and_disconnect_round_completes(tmp_path):
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate

    out = tmp_path / "faults"
    faults = {2: "tamper@1", 3: "nan@1", 4: "shape@1", 5: "unsigned@1", 6: "replay@1", 7: "exit@1"}
    cfg = FedConfig(model="tiny-random-llama", task="sms_spam", clients=8, rounds=1, ranks=[2], local_steps=1,
                    eval_limit=8, max_train=400, min_clients=2, straggler_timeout=90, round_timeout=200,
                    partition="iid")
    try:
        s = federate(cfg, out, faults=faults, timeout=280)
        assert s["leftover_processes"] == []
        rec = next(r for r in _log(out) if r["event"] == "round" and r["round"] == 1)
        assert sorted(c["client_id"] for c in rec["clients"]) == ["client-0", "client-1"]
        why = {x.get("client_id"): x["reason"] for x in rec["rejected"]}
        assert "bad signature" in why["client-2"]
        assert "non-finite" in why["client-3"]
        assert "wrong shape" in why["client-4"]
        assert "unsigned" in why["client-5"]
        assert "replayed" in why["client-6"]
        assert "client-7" not in why and not (out / "round-1" / "client-7").exists()  # disconnected: no update
        node_errors = [x for x in rec["rejected"] if "client_id" not in x]  # the vanished node, reported by Flower
        assert rec["missing"] + len(rec["disconnected_nodes"]) + len(node_errors) >= 1
        assert sorted(p.name for p in (out / "round-1").iterdir()) == ["client-0", "client-1", "global"]
        assert rec["aggregation_error"] < 1e-6
    finally:
        assert _procs_under(out) == []


def test_server_restart_resumes_from_last_completed_round(tmp_path, monkeypatch):
    from patchlm.errors import PatchlmError
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate
    from patchlm.patch import _sha256

    out = tmp_path / "resume"
    cfg = {"model": "tiny-random-llama", "task": "sms_spam", "clients": 2, "rounds": 3, "ranks": [2], "local_steps": 3,
           "eval_limit": 8, "lr": 5e-3, "max_train": 200, "aggregation": "fedit", "sign": "none"}
    try:
        monkeypatch.setenv("PATCHLM_FED_CRASH_AFTER_ROUND", "1")
        with pytest.raises(PatchlmError, match="injected server crash after round 1"):
            federate(FedConfig(**cfg), out, timeout=200)
        assert json.loads((out / "state.json").read_text())["completed_round"] == 1
        g1 = _sha256(out / "round-1" / "global" / "patch" / "tensors.safetensors")
        assert not (out / "round-2").exists()
        monkeypatch.delenv("PATCHLM_FED_CRASH_AFTER_ROUND")
        # client-1 loses its history cache before round 3: it reports the miss and gets the whole history resent
        s = federate(FedConfig(**cfg), out, resume=True, timeout=200, faults={1: "nocache@3"})
        assert [r["round"] for r in s["rounds"]] == [1, 2, 3]
        assert _sha256(out / "round-1" / "global" / "patch" / "tensors.safetensors") == g1  # round 1 kept as it was
        assert (out / "round-2" / "global" / "patch").exists()
        assert any(r["event"] == "resume" and r["completed_round"] == 1 for r in _log(out))
        r2, r3 = (next(r for r in _log(out) if r["event"] == "round" and r["round"] == i) for i in (2, 3))
        assert len(r3["resent_full_history"]) == 1 and len(r3["clients"]) == 2 and r3["rejected"] == []
        # delta broadcast: round 3 carries client-0 only round 2's global (it cached round 1), not both
        g_bytes = (out / "round-1" / "global" / "patch" / "tensors.safetensors").stat().st_size
        down = {i: {c["client_id"]: c["bytes_down"] for c in r["clients"]} for i, r in ((2, r2), (3, r3))}
        assert down[3]["client-0"] < down[2]["client-0"] + g_bytes / 2
        assert down[3]["client-1"] > down[2]["client-1"] + g_bytes / 2  # the miss: the whole history resent
        for k in (0, 1):  # each client cached the rounds it verified (client-1 again after its loss)
            cached = sorted(p.name for p in (out / ".flower" / "cache").glob(f"*/client-{k}/round-*.safetensors"))
            assert cached == ["round-1.safetensors", "round-2.safetensors"]
        fedit_err = s["rounds"][-1]["aggregation_error"]
        assert fedit_err > 1e-6  # FedIT's product of averages is not the average of products
    finally:
        assert _procs_under(out) == []


def test_continue_protocol_clients_keep_training_the_global_adapter(tmp_path):
    """FedIT's own protocol: the global LoRA is not merged into the base; clients start from it next round."""
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate
    from patchlm.federated.flower.task import init_lora_tensors, load_model, round_seed
    from patchlm.patch import Patch

    out = tmp_path / "cont"
    cfg = FedConfig(model="tiny-random-llama", task="sms_spam", clients=2, rounds=2, ranks=[2], local_steps=2,
                    eval_limit=8, max_train=200, aggregation="fedit", protocol="continue", lr=1e-3)
    try:
        federate(cfg, out, timeout=200)
        g1 = Patch.load(out / "round-1" / "global" / "patch").tensors
        g2 = Patch.load(out / "round-2" / "global" / "patch").tensors
        final = Patch.load(out / "final" / "patch").tensors
        assert all(torch.equal(final[k], g2[k]) for k in g2)  # the last global adapter, not a stack of rounds
        fresh = init_lora_tensors(load_model(cfg).model, cfg.targets, 2, round_seed(cfg, 2))
        for k in (0, 1):
            upd = Patch.load(out / "round-2" / f"client-{k}" / "patch").tensors
            for name in (n for n in upd if n.endswith("lora_A")):
                # a few small steps from the round-1 global A, far from the fresh A a merge-protocol client draws
                assert (upd[name] - g1[name]).norm() < 0.1 * (upd[name] - fresh[name]).norm()
            b = next(n for n in upd if n.endswith("lora_B"))
            assert upd[b].norm() > 0
        log = [r for r in _log(out) if r["event"] == "round" and r["round"] > 0]
        assert [len(r["clients"]) for r in log] == [2, 2]
    finally:
        assert _procs_under(out) == []


def test_bad_input_changes_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    code, _, err = run_cli(["federate", "--protocol", "continue", "--out", str(out)], capsys)
    assert code == 2 and "does not fit flora" in err
    code, _, err = run_cli(["federate", "--clients", "2", "--aggregation", "fedit", "--ranks", "4,2",
                            "--out", str(out)], capsys)
    assert code == 2 and "mixed ranks" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["federate", "--clients", "3", "--ranks", "4,2", "--out", str(out)], capsys)
    assert code == 2 and "ranks has 2 values for 3 clients" in err and "(option --ranks)" in err
    code, _, err = run_cli(["federate", "--alpha-dirichlet", "-1", "--out", str(out)], capsys)
    assert code == 2 and "dirichlet_alpha must be positive, got -1" in err and "(option --dirichlet-alpha)" in err
    code, _, err = run_cli(["federate", "--dp", "--dp-noise", "-1", "--out", str(out)], capsys)
    assert code == 2 and "dp_noise must be >= 0" in err and "(option --dp-noise)" in err
    code, _, err = run_cli(["federate", "--aggregation", "flor", "--out", str(out)], capsys)
    assert code == 2 and "flora" in err
    code, _, err = run_cli(["federate", "--model", "no-such-model", "--out", str(out)], capsys)
    assert code == 2 and "unknown model" in err
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("keep")
    code, _, err = run_cli(["federate", "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "x").read_text() == "keep"
    code, _, err = run_cli(["federate", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
