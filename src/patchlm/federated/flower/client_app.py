"""The Flower ClientApp: verifies the server's signed broadcast, merges the global history into its base,
trains a fresh LoRA on its own data partition (plain or DP-SGD), signs the update and replies.

The broadcast carries the digest of every previous global update (signed by the server) and the tensors of the
rounds this node does not hold yet; the node keeps verified rounds in its history cache and reports how many it
holds, so later broadcasts carry only the new rounds.

Node config (flower-supernode --node-config): partition-id, num-partitions, key-file (this client's private
key), registry (public keys, for the server's key), optional data (a local data file instead of a partition of a
built-in task), client-id, lock (a file lock so clients on one machine train one at a time), history-cache (a
directory [$PATCHLM_HOME/fed-cache]) and, for tests, fault.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@contextmanager
def _file_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_dir(nc, run_id: str, cid: str):
    from pathlib import Path

    from patchlm.paths import home

    root = Path(str(nc["history-cache"])) if nc.get("history-cache") else home() / "fed-cache"
    return root / run_id / cid


def _cache_save(d, r: int, tensors: dict) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".round-{r}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, d / f"round-{r}.safetensors")


def latest_global(received: dict, digests: list[str]) -> list:
    """Continue protocol: only the last global adapter is needed; it must match its signed digest."""
    from patchlm.federated.flower.strategy import round_digest

    if not digests:
        return []
    if sorted(received) != [len(digests)]:
        raise PermissionError(f"the broadcast carries rounds {sorted(received)}, expected the last one ({len(digests)})")
    t = received[len(digests)]
    if round_digest(t) != digests[-1]:
        raise PermissionError(f"the broadcast's round {len(digests)} does not match the signed digest")
    return [t]


def assemble_history(received: dict, digests: list[str], start: int, cache, ignore_cache: bool = False) -> list:
    """Every previous global round, verified against the signed digests: rounds < start come from the node's
    cache (a missing or altered one raises the cache-miss error, so the server resends the whole history),
    rounds >= start from the broadcast (an altered one is refused), and the new ones are added to the cache."""
    from safetensors.torch import load_file

    from patchlm.federated.flower.strategy import CACHE_MISS, round_digest

    if sorted(received) != list(range(start, len(digests) + 1)):
        raise PermissionError(f"the broadcast carries rounds {sorted(received)}, expected {start}..{len(digests)}")
    history = []
    for r in range(1, len(digests) + 1):
        if r < start:
            f = cache / f"round-{r}.safetensors"
            t = load_file(str(f)) if f.exists() and not ignore_cache else None
            if t is None or round_digest(t) != digests[r - 1]:
                if f.exists():
                    f.unlink()
                raise RuntimeError(f"{CACHE_MISS}: round {r} is not in {cache} (or does not match its digest)")
        else:
            t = received[r]
            if round_digest(t) != digests[r - 1]:
                raise PermissionError(f"the broadcast's round {r} does not match the signed digest")
            _cache_save(cache, r, t)
        history.append(t)
    return history


def _fault(context: Context, round_: int) -> str:
    """Test-only fault injection: node config fault='<kind>@<round>' (kinds: exit, hang, nan, shape, tamper,
    unsigned, replay, wrongkey, unknown, nocache)."""
    spec = str(context.node_config.get("fault", ""))
    if "@" not in spec:
        return ""
    kind, r = spec.split("@", 1)
    return kind if int(r) == round_ else ""


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from patchlm.federated.flower.strategy import broadcast_context, history_rounds
    from patchlm.federated.flower.task import FedConfig, client_examples, load_fed_task, load_model, local_train
    from patchlm.federated.signing import KeyPair, KeyRegistry, sign_tensors, signed_message, update_context, verify

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfgrec = msg.content["config"]
    r = int(cfgrec["round"])
    cfg = FedConfig.from_dict(json.loads(str(cfgrec["fed"])))
    nc = context.node_config
    k = int(nc.get("partition-id", 0))
    cid = str(nc.get("client-id", f"client-{k}"))
    fault = _fault(context, r)
    digests = json.loads(str(cfgrec.get("history-digests", "[]")))
    start = int(cfgrec.get("history-from", 1))
    verify_s = 0.0
    if cfg.sign != "none":  # the server's broadcast must carry a valid signature from the registry's server key
        t0 = time.perf_counter()
        reg = KeyRegistry.load(str(nc["registry"]))
        scheme, pk = reg.get("server") or (None, None)
        sig = cfgrec.get("broadcast-signature")
        message = signed_message({}, broadcast_context(cfg.run_id, r, digests))
        if pk is None or not sig or not verify(scheme, pk, message, bytes(sig)):
            raise PermissionError(f"{cid}: the server's broadcast for round {r} is unsigned or its signature is invalid")
        verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    received = history_rounds(msg.content["globals"])
    if cfg.protocol == "continue":
        history = latest_global(received, digests)
    else:
        history = assemble_history(received, digests, start, _cache_dir(nc, cfg.run_id, cid),
                                   ignore_cache=fault == "nocache")
    verify_s += time.perf_counter() - t0  # hashing the received (and cached) rounds against the signed digests
    if fault == "exit":  # disconnect for real: stop this client's SuperNode mid-round
        import psutil

        for p in psutil.Process().parents():
            if any("flower-supernode" in part for part in p.cmdline()):
                p.terminate()
        time.sleep(60)
    if fault == "hang":
        time.sleep(3600)
    with _file_lock(nc.get("lock")):
        base = load_model(cfg, history)
        if nc.get("data"):
            from patchlm.data import load_task

            task = load_task(str(nc["data"]), seed=cfg.seed)
            examples = task.train
        else:
            task = load_fed_task(cfg)
            examples = client_examples(task, cfg, k)
        start_from = history[-1] if cfg.protocol == "continue" and history else None
        tensors, metrics = local_train(base, cfg, k, r, examples, task, start=start_from)
    n = len(examples)
    if fault == "nan":
        first = sorted(tensors)[1]
        tensors[first][0, 0] = float("nan")
    if fault == "shape":
        first = next(x for x in sorted(tensors) if x.endswith("lora_A"))
        tensors[first] = torch.zeros(tensors[first].shape[0], tensors[first].shape[1] + 1)
    meta = ConfigRecord({"client-id": cid, "run-id": cfg.run_id, "round": r, "num-samples": n,
                         "alpha": float(metrics["alpha"]), "history-rounds": len(history) if cfg.protocol == "merge" else 0})
    sign_round = r - 1 if fault == "replay" else r
    if cfg.sign != "none" and fault != "unsigned":
        key = KeyPair.load(str(nc["key-file"]))
        if fault == "wrongkey":
            key = KeyPair.generate(key.scheme)
        if fault == "unknown":
            meta["client-id"] = cid = f"{cid}-impostor"
        sig, secs = sign_tensors(key, tensors, update_context(cfg.run_id, sign_round, cid, n, alpha=metrics["alpha"]))
        meta["signature"] = sig
        meta["scheme"] = key.scheme
        metrics["sign_seconds"] = secs
        metrics["signature_bytes"] = len(sig)
    if fault == "replay":
        meta["round"] = sign_round
    if fault == "tamper":
        name = next(x for x in sorted(tensors) if x.endswith("lora_B"))
        tensors[name] = tensors[name] + 1e-3
    metrics["verify_seconds"] = verify_s
    meta["metrics-json"] = json.dumps(metrics, default=float)
    reply = RecordDict({"arrays": ArrayRecord({kk: v.contiguous() for kk, v in tensors.items()}), "meta": meta,
                        "metrics": MetricRecord({"num-examples": n, "train-loss": float(metrics["train_loss"])})})
    return Message(content=reply, reply_to=msg)
