"""What a client accepts from the server's broadcast, below the full Flower runs: the signed digest list, the
rounds from the broadcast and from the node's cache (assemble_history / latest_global), and the wire records.
Each attack is refused: a tampered round or digest, a replayed round or broadcast, an unknown key, a missing round."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from patchlm.federated.flower.history import (
    accept_broadcast,
    assemble_history,
    cache_dir,
    check_signature,
    latest_global,
)
from patchlm.federated.flower.wire import (
    CACHE_MISS,
    Broadcast,
    Reply,
    broadcast_config,
    broadcast_content,
    read_broadcast,
    read_reply,
    reply_content,
)
from patchlm.federated.signing import (
    KeyPair,
    KeyRegistry,
    UpdateVerifier,
    broadcast_context,
    round_digest,
    sign_tensors,
    update_context,
)

RUN = "run-1"


def _rounds(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"m.lora_A": torch.randn(2, 5, generator=gen), "m.lora_B": torch.randn(3, 2, generator=gen)}
            for _ in range(n)]


def _signed(key: KeyPair, round_: int, digests: list[str]) -> bytes:
    return sign_tensors(key, {}, broadcast_context(RUN, round_, digests))[0]


@pytest.fixture(scope="module")
def server():
    key = KeyPair.generate("mldsa")
    reg = KeyRegistry()
    reg.add("server", key.scheme, key.public_key)
    return key, reg


# ---------------------------------------------------------------- assemble_history
def test_assemble_history_verifies_and_caches_every_round(tmp_path):
    hist = _rounds(3)
    digests = [round_digest(t) for t in hist]
    got = assemble_history({1: hist[0], 2: hist[1]}, digests[:2], 1, tmp_path)  # round 3's broadcast
    assert all(torch.equal(g[k], h[k]) for g, h in zip(got, hist[:2], strict=True) for k in h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1.safetensors", "round-2.safetensors"]
    # round 4's delta broadcast: rounds 1-2 from the cache, round 3 from the message
    got = assemble_history({3: hist[2]}, digests, 3, tmp_path)
    assert len(got) == 3 and all(torch.equal(g[k], h[k]) for g, h in zip(got, hist, strict=True) for k in h)
    assert (tmp_path / "round-3.safetensors").exists()
    assert assemble_history({}, [], 1, tmp_path) == []  # round 1: no history yet


def test_assemble_history_refuses_a_tampered_round(tmp_path):
    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    bad = {**hist[1], "m.lora_B": hist[1]["m.lora_B"] + 1e-6}
    with pytest.raises(PermissionError, match="round 2 does not match the signed digest"):
        assemble_history({1: hist[0], 2: bad}, digests, 1, tmp_path)
    assert not (tmp_path / "round-2.safetensors").exists()  # nothing unverified reaches the cache


def test_assemble_history_refuses_a_tampered_digest(tmp_path):
    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    digests[0] = round_digest(_rounds(3)[2])
    with pytest.raises(PermissionError, match="round 1 does not match"):
        assemble_history({1: hist[0], 2: hist[1]}, digests, 1, tmp_path)


def test_assemble_history_refuses_a_replayed_round(tmp_path):
    """An earlier round's global sent again as a later round's."""
    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    with pytest.raises(PermissionError, match="round 2 does not match"):
        assemble_history({1: hist[0], 2: hist[0]}, digests, 1, tmp_path)


def test_assemble_history_refuses_a_missing_round(tmp_path):
    hist = _rounds(3)
    digests = [round_digest(t) for t in hist]
    with pytest.raises(PermissionError, match=r"carries rounds \[1, 3\], expected 1..3"):
        assemble_history({1: hist[0], 3: hist[2]}, digests, 1, tmp_path)
    with pytest.raises(PermissionError, match=r"expected 2\.\.3"):  # an extra round is refused as well
        assemble_history({1: hist[0], 2: hist[1], 3: hist[2]}, digests, 2, tmp_path)
    # a round the node should hold but does not: the cache-miss error (the server then resends everything)
    with pytest.raises(RuntimeError, match=CACHE_MISS):
        assemble_history({3: hist[2]}, digests, 3, tmp_path)


def test_assemble_history_drops_an_altered_cache_file(tmp_path):
    from safetensors.torch import save_file

    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    assemble_history({1: hist[0]}, digests[:1], 1, tmp_path)
    save_file({k: v + 1 for k, v in hist[0].items()}, str(tmp_path / "round-1.safetensors"))
    with pytest.raises(RuntimeError, match=CACHE_MISS):
        assemble_history({2: hist[1]}, digests, 2, tmp_path)
    assert not (tmp_path / "round-1.safetensors").exists()


# ---------------------------------------------------------------- latest_global (continue protocol)
def test_latest_global_takes_only_the_verified_last_round():
    hist = _rounds(3)
    digests = [round_digest(t) for t in hist]
    assert latest_global({}, []) == []
    (got,) = latest_global({3: hist[2]}, digests)
    assert all(torch.equal(got[k], hist[2][k]) for k in got)
    with pytest.raises(PermissionError, match="does not match the signed digest"):  # replayed: round 2's adapter
        latest_global({3: hist[1]}, digests)
    with pytest.raises(PermissionError, match="expected the last one"):  # missing: an older round only
        latest_global({2: hist[1]}, digests)
    with pytest.raises(PermissionError, match="expected the last one"):
        latest_global({}, digests)


# ---------------------------------------------------------------- the broadcast signature
def test_broadcast_signature_binds_run_round_and_digests(server, tmp_path):
    key, reg = server
    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    ok = Broadcast(round=3, fed={}, digests=digests, start=1, received={1: hist[0], 2: hist[1]},
                   signature=_signed(key, 3, digests))
    check_signature(ok, RUN, reg)
    cases = {
        "tampered digest": Broadcast(3, {}, [digests[1], digests[0]], 1, ok.received, ok.signature),
        "replayed broadcast": Broadcast(3, {}, digests[:1], 1, {1: hist[0]}, _signed(key, 2, digests[:1])),
        "another run": Broadcast(3, {}, digests, 1, ok.received, sign_tensors(
            key, {}, broadcast_context("run-0", 3, digests))[0]),
        "unknown key": Broadcast(3, {}, digests, 1, ok.received, _signed(KeyPair.generate("mldsa"), 3, digests)),
        "unsigned": Broadcast(3, {}, digests, 1, ok.received, None),
    }
    for why, b in cases.items():
        with pytest.raises(PermissionError, match="unsigned or its signature is invalid"):
            check_signature(b, RUN, reg)
            pytest.fail(why)
    with pytest.raises(PermissionError, match="signature is invalid"):  # a registry without the server's key
        check_signature(ok, RUN, KeyRegistry())


def test_accept_broadcast_over_the_wire_records(server, tmp_path):
    """The server's records, read back by the client: accepted when intact, refused when a byte changes."""
    key, reg = server
    hist = _rounds(2)
    digests = [round_digest(t) for t in hist]
    config = broadcast_config(3, '{"x": 1}', digests, _signed(key, 3, digests), key.scheme)
    content, size = broadcast_content(config, hist, 1)
    assert size > sum(v.numel() * 4 for t in hist for v in t.values())
    b = read_broadcast(content)
    assert (b.round, b.fed, b.digests, b.start, sorted(b.received)) == (3, {"x": 1}, digests, 1, [1, 2])
    got = accept_broadcast(b, RUN, "merge", tmp_path / "cache", reg)
    assert len(got) == 2 and all(torch.equal(got[1][k], hist[1][k]) for k in hist[1])
    delta, small = broadcast_content(config, hist, 2)  # the delta broadcast carries round 2 only
    assert small < size and sorted(read_broadcast(delta).received) == [2]
    assert len(accept_broadcast(read_broadcast(delta), RUN, "merge", tmp_path / "cache", reg)) == 2
    b.received[2]["m.lora_A"][0, 0] += 1
    with pytest.raises(PermissionError):
        accept_broadcast(b, RUN, "merge", tmp_path / "other", reg)
    # continue protocol: only the last round travels
    last, _ = broadcast_content(config, hist, 2)
    assert len(accept_broadcast(read_broadcast(last), RUN, "continue", tmp_path / "c", reg)) == 1


def test_cache_dir_is_per_run_and_client(tmp_path):
    assert cache_dir({"history-cache": str(tmp_path)}, "r", "client-1") == tmp_path / "r" / "client-1"


# ---------------------------------------------------------------- the reply
def test_reply_round_trip_is_what_the_server_verifies():
    key = KeyPair.generate("mldsa")
    reg = KeyRegistry()
    reg.add("client-0", key.scheme, key.public_key)
    tensors = _rounds(1)[0]
    sig, _ = sign_tensors(key, tensors, update_context(RUN, 2, "client-0", 17, alpha=8.0))
    sent = Reply("client-0", RUN, 2, 17, 8.0, tensors, {"train_loss": 0.5}, history_rounds=1, signature=sig,
                 scheme=key.scheme)
    got, up = read_reply(reply_content(sent))
    assert up > 0 and got.metrics == {"train_loss": 0.5} and got.history_rounds == 1
    assert got.claimed() == {"run_id": RUN, "round": 2, "client_id": "client-0", "num_samples": 17,
                             "scheme": "mldsa", "alpha": 8.0}
    assert all(torch.equal(got.tensors[k], tensors[k]) for k in tensors)
    verifier = UpdateVerifier(reg, RUN)
    assert verifier.check(got.tensors, got.claimed(), got.signature, 2).ok
    assert "replayed" in verifier.check(got.tensors, got.claimed(), got.signature, 3).reason
    from flwr.app import RecordDict

    with pytest.raises(KeyError):  # no tensors: the server records a malformed reply
        read_reply(RecordDict({"meta": reply_content(sent)["meta"]}))


def test_client_app_imports_no_server_code():
    code = ("import sys, patchlm.federated.flower.client_app; "
            "bad = [m for m in sys.modules if m.startswith('patchlm.federated.flower.') and "
            "m.rsplit('.', 1)[1] in ('strategy', 'server_app', 'run', 'deploy')]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fault_spec_is_read_in_one_place():
    from patchlm.federated.flower.faults import fault_for

    assert fault_for({}, 1) == ""
    assert fault_for({"fault": "nan@2"}, 2) == "nan" and fault_for({"fault": "nan@2"}, 1) == ""
    with pytest.raises(ValueError, match="unknown test fault"):
        fault_for({"fault": "boom@1"}, 1)
