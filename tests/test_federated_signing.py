"""Post-quantum signing of updates: canonical serialisation, ML-DSA / SLH-DSA, every rejection case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchlm.federated.signing import (
    KeyPair,
    KeyRegistry,
    UpdateVerifier,
    generate_keypair,
    sign,
    sign_tensors,
    signed_message,
    tensors_digest,
    update_context,
    verify,
)


def tensors():
    return {"m.lora_B": torch.arange(6, dtype=torch.float32).view(3, 2), "m.lora_A": torch.ones(2, 4)}


def test_digest_is_canonical_and_sensitive():
    t = tensors()
    d = tensors_digest(t)
    assert tensors_digest(dict(reversed(list(t.items())))) == d          # order of insertion does not matter
    assert tensors_digest({k: v.numpy() for k, v in t.items()}) == d     # numpy == torch
    t2 = tensors()
    t2["m.lora_A"][1, 3] = float(np.nextafter(np.float32(1), np.float32(2)))   # one ulp in one entry
    assert tensors_digest(t2) != d
    assert tensors_digest({"m.lora_A": torch.ones(4, 2), "m.lora_B": t["m.lora_B"]}) != d   # shape counts
    assert tensors_digest({"m.lora_A": torch.ones(2, 4, dtype=torch.float64), "m.lora_B": t["m.lora_B"]}) != d
    assert tensors_digest({"x.lora_A": torch.ones(2, 4), "m.lora_B": t["m.lora_B"]}) != d  # names count


@pytest.mark.parametrize("scheme,sig_len", [("mldsa", 3309), ("slhdsa", 7856)])
def test_sign_verify_roundtrip(scheme, sig_len):
    sk, pk = generate_keypair(scheme)
    msg = signed_message(tensors(), update_context("run", 1, "client-0", 10))
    sig = sign(scheme, sk, msg)
    assert len(sig) == sig_len
    assert verify(scheme, pk, msg, sig)
    assert not verify(scheme, pk, msg + b"x", sig)
    _, pk2 = generate_keypair(scheme)
    assert not verify(scheme, pk2, msg, sig)


def test_keys_save_load(tmp_path):
    k = KeyPair.generate("mldsa")
    k.save(tmp_path / "c.key")
    k2 = KeyPair.load(tmp_path / "c.key")
    assert k2.public_key == k.public_key and (tmp_path / "c.key").stat().st_mode & 0o777 == 0o600
    reg = KeyRegistry()
    reg.add("client-0", "mldsa", k.public_key)
    reg.save(tmp_path / "reg.json")
    assert KeyRegistry.load(tmp_path / "reg.json").get("client-0") == ("mldsa", k.public_key)


def test_every_rejection_case():
    key, other = KeyPair.generate("mldsa"), KeyPair.generate("mldsa")
    reg = KeyRegistry()
    reg.add("client-0", "mldsa", key.public_key)
    ver = UpdateVerifier(reg, "run-A")
    t = tensors()
    claimed = {"run_id": "run-A", "round": 2, "client_id": "client-0", "num_samples": 10, "scheme": "mldsa"}
    sig, secs = sign_tensors(key, t, update_context("run-A", 2, "client-0", 10))
    assert secs >= 0
    # unsigned
    v = ver.check(t, claimed, None, 2)
    assert not v.ok and "unsigned" in v.reason
    # unknown key (client not in registry)
    v = ver.check(t, {**claimed, "client_id": "client-9"}, sig, 2)
    assert not v.ok and "unknown key" in v.reason
    # tampered tensor
    bad = {k: x.clone() for k, x in t.items()}
    bad["m.lora_B"][0, 0] += 1e-3
    v = ver.check(bad, claimed, sig, 2)
    assert not v.ok and "bad signature" in v.reason
    # tampered metadata (num_samples inflated to gain weight)
    v = ver.check(t, {**claimed, "num_samples": 1000}, sig, 2)
    assert not v.ok and "bad signature" in v.reason
    # signed by another key
    sig_other, _ = sign_tensors(other, t, update_context("run-A", 2, "client-0", 10))
    v = ver.check(t, claimed, sig_other, 2)
    assert not v.ok and "bad signature" in v.reason
    # replayed into a later round, as is and with the round rewritten
    v = ver.check(t, claimed, sig, 3)
    assert not v.ok and "replayed" in v.reason
    v = ver.check(t, {**claimed, "round": 3}, sig, 3)
    assert not v.ok and "bad signature" in v.reason
    # replayed into another run
    v = UpdateVerifier(reg, "run-B").check(t, claimed, sig, 2)
    assert not v.ok and "replayed" in v.reason
    # the genuine update passes once; the same signed update a second time is a replay
    assert ver.check(t, claimed, sig, 2).ok
    v = ver.check(t, claimed, sig, 2)
    assert not v.ok and "replayed" in v.reason
