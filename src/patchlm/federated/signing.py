"""Post-quantum signatures on federated updates: ML-DSA-65 (pyca/cryptography, default) or SLH-DSA
(SLH-DSA-SHA2-128s from the `pqcrypto` package, hash-based).

What is signed is a canonical serialisation, never `str(params)`: a domain tag, the binding context as sorted
JSON (run id, round, client id, role, data size), then for every tensor in sorted name order its name, dtype,
shape and raw little-endian bytes. The tensors are streamed through SHA3-512 and the signature covers
(tag, context, digest), so a signature made for one run, round or client cannot be replayed for another, and
any change to one byte of one tensor breaks it. Public keys live in a registry (JSON) distributed out of band.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchlm.errors import ConfigError, PatchFormatError, UnknownNameError, did_you_mean
from patchlm.paths import atomic_write_text

TAG = b"patchlm-federated-v1\x00"
SCHEMES = ("mldsa", "slhdsa")


# ---------------------------------------------------------------- canonical serialisation
def _as_array(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.ascontiguousarray(t)


def tensors_digest(tensors: dict) -> bytes:
    """SHA3-512 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha3_512()
    h.update(len(tensors).to_bytes(8, "little"))
    for name in sorted(tensors):
        a = _as_array(tensors[name])
        dt = a.dtype.newbyteorder("<")
        raw = a.astype(dt, copy=False).tobytes(order="C")
        for part in (name.encode(), dt.str.encode(), json.dumps(list(a.shape)).encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


def signed_message(tensors: dict, context: dict) -> bytes:
    """The bytes a signature covers: tag, canonical JSON of the binding context, tensors digest."""
    ctx = json.dumps(context, sort_keys=True, separators=(",", ":")).encode()
    return TAG + len(ctx).to_bytes(8, "little") + ctx + tensors_digest(tensors)


def update_context(run_id: str, round_: int, client_id: str, num_samples: int, role: str = "update",
                   alpha: float | None = None) -> dict:
    """The binding context of a client update (or of the server broadcast with role='broadcast').

    num_samples (the aggregation weight) and alpha (the LoRA scaling alpha / r) are signed too: a client's
    influence on the aggregate cannot be changed in transit."""
    ctx = {"run_id": str(run_id), "round": int(round_), "client_id": str(client_id), "role": role,
           "num_samples": int(num_samples)}
    if alpha is not None:
        ctx["alpha"] = float(alpha)
    return ctx


def broadcast_context(run_id: str, round_: int, digests: list[str]) -> dict:
    """What the server signs each round: the run, the round and the digest of every previous global update."""
    return {**update_context(run_id, round_, "server", 0, role="broadcast"), "history": list(digests)}


def round_digest(tensors: dict) -> str:
    """A global update's digest as the broadcast lists it: SHA3-512 of its canonical serialisation, in hex."""
    return tensors_digest(tensors).hex()


# ---------------------------------------------------------------- schemes
def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UnknownNameError(f"unknown signature scheme {scheme!r}; {did_you_mean(scheme, SCHEMES)} (or none)")
    return scheme


def generate_keypair(scheme: str = "mldsa") -> tuple[bytes, bytes]:
    """(private key, public key) raw bytes for the scheme."""
    _check_scheme(scheme)
    if scheme == "mldsa":
        from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

        sk = MLDSA65PrivateKey.generate()
        return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()
    from pqcrypto.sign import slh_dsa_sha2_128s as slh

    pk, sk = slh.keygen()
    return bytes(sk), bytes(pk)


def sign(scheme: str, private_key: bytes, message: bytes) -> bytes:
    _check_scheme(scheme)
    if scheme == "mldsa":
        from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

        return MLDSA65PrivateKey.from_seed_bytes(private_key).sign(message)
    from pqcrypto.sign import slh_dsa_sha2_128s as slh

    return bytes(slh.sign(private_key, message))


def verify(scheme: str, public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when the signature is valid for message under public_key; False otherwise (never raises on bad input)."""
    _check_scheme(scheme)
    if not signature:
        return False
    try:
        if scheme == "mldsa":
            from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey

            MLDSA65PublicKey.from_public_bytes(public_key).verify(signature, message)
            return True
        from pqcrypto.sign import slh_dsa_sha2_128s as slh

        slh.verify(public_key, message, signature)
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- keys on disk
@dataclass
class KeyPair:
    scheme: str
    private_key: bytes
    public_key: bytes

    def sign(self, message: bytes) -> bytes:
        return sign(self.scheme, self.private_key, message)

    def save(self, path: str | Path) -> Path:
        """Write the key pair as JSON (mode 600)."""
        path = Path(path)
        data = {"scheme": self.scheme, "private_key": _b64(self.private_key), "public_key": _b64(self.public_key)}
        atomic_write_text(path, json.dumps(data), mode=0o600)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no key file at {path}; create one with `patchlm federate-keygen --out {path}`")
        try:
            d = json.loads(path.read_text(), parse_constant=_no_constant)
            kp = cls(_check_scheme(d["scheme"]), _unb64(d["private_key"]), _unb64(d["public_key"]))
            _check_pair(kp)
            return kp
        except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as e:
            raise PatchFormatError(f"{path} is not a patchlm key file ({type(e).__name__}: {e})") from e

    @classmethod
    def generate(cls, scheme: str = "mldsa") -> KeyPair:
        sk, pk = generate_keypair(scheme)
        return cls(scheme, sk, pk)


def _check_pair(kp: KeyPair) -> None:
    """ValueError unless the private key has its scheme's size and matches the public key (when derivable)."""
    if kp.scheme == "mldsa":
        from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

        if MLDSA65PrivateKey.from_seed_bytes(kp.private_key).public_key().public_bytes_raw() != kp.public_key:
            raise ValueError("its public key does not belong to its private key")
        return
    from pqcrypto.sign import slh_dsa_sha2_128s as slh

    if len(kp.private_key) != slh.SECRET_KEY_SIZE or len(kp.public_key) != slh.PUBLIC_KEY_SIZE:
        raise ValueError(f"an slhdsa key pair has {slh.SECRET_KEY_SIZE}- and {slh.PUBLIC_KEY_SIZE}-byte keys")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"a key must be base64 text, got {type(s).__name__}")
    return base64.b64decode(s.encode(), validate=True)


def _no_constant(name: str):
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


class KeyRegistry:
    """Public keys by identity (client ids and "server"), read from / written to a JSON file."""

    def __init__(self, keys: dict[str, tuple[str, bytes]] | None = None):
        self.keys = dict(keys or {})

    def add(self, identity: str, scheme: str, public_key: bytes) -> None:
        self.keys[identity] = (_check_scheme(scheme), public_key)

    def get(self, identity: str) -> tuple[str, bytes] | None:
        return self.keys.get(identity)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {k: {"scheme": s, "public_key": _b64(pk)} for k, (s, pk) in sorted(self.keys.items())}
        atomic_write_text(path, json.dumps(data, indent=1), mode=0o644)
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyRegistry:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no public-key registry at {path}")
        try:
            d = json.loads(path.read_text(), parse_constant=_no_constant)
            if not isinstance(d, dict):
                raise ValueError("expected a JSON object of identity -> {scheme, public_key}")
            return cls({str(k): (_check_scheme(v["scheme"]), _unb64(v["public_key"])) for k, v in d.items()})
        except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as e:
            raise PatchFormatError(f"{path} is not a patchlm public-key registry ({type(e).__name__}: {e}); "
                                   "make one with `patchlm federate-keygen --registry`") from e


# ---------------------------------------------------------------- sign / verify an update
def sign_tensors(key: KeyPair, tensors: dict, context: dict) -> tuple[bytes, float]:
    """(signature, seconds spent) over the canonical serialisation of tensors bound to context."""
    t0 = time.perf_counter()
    sig = key.sign(signed_message(tensors, context))
    return sig, time.perf_counter() - t0


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    seconds: float = 0.0


class UpdateVerifier:
    """Checks client updates against a key registry; remembers signatures it has accepted (replay guard)."""

    def __init__(self, registry: KeyRegistry, run_id: str):
        self.registry, self.run_id = registry, str(run_id)
        self.seen: set[bytes] = set()

    def check(self, tensors: dict, claimed: dict, signature: bytes | None, round_: int) -> Verdict:
        """claimed: the context the client states (run_id, round, client_id, num_samples, scheme)."""
        t0 = time.perf_counter()
        cid = str(claimed.get("client_id", ""))

        def no(reason: str) -> Verdict:
            return Verdict(False, reason, time.perf_counter() - t0)

        if not signature:
            return no("unsigned update")
        entry = self.registry.get(cid)
        if entry is None:
            return no(f"unknown key: client id {cid!r} is not in the public-key registry")
        scheme, pk = entry
        if claimed.get("scheme") not in (None, scheme):
            return no(f"signed with {claimed.get('scheme')} but the registry holds a {scheme} key for {cid}")
        if str(claimed.get("run_id")) != self.run_id or int(claimed.get("round", -1)) != int(round_):
            return no(f"replayed: update is for run {claimed.get('run_id')} round {claimed.get('round')}, "
                      f"this is run {self.run_id} round {round_}")
        if signature in self.seen:
            return no("replayed: this exact signed update was already accepted")
        alpha = claimed.get("alpha")
        ctx = update_context(self.run_id, round_, cid, int(claimed.get("num_samples", 0)),
                             alpha=None if alpha is None else float(alpha))
        if not verify(scheme, pk, signed_message(tensors, ctx), signature):
            return no("bad signature: tensors or metadata were altered after signing (or signed by another key)")
        self.seen.add(signature)
        return Verdict(True, "", time.perf_counter() - t0)
