"""The Flower ClientApp: verifies the server's signed broadcast, merges the global history into its base,
trains a fresh LoRA on its own data partition (plain or DP-SGD), signs the update and replies.

Node config (flower-supernode --node-config): partition-id, num-partitions, key-file (this client's private
key), registry (public keys, for the server's key), optional data (a local data file instead of a partition of a
built-in task), client-id, lock (a file lock so clients on one machine train one at a time) and, for tests, fault.
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


def _fault(context: Context, round_: int) -> str:
    """Test-only fault injection: node config fault='<kind>@<round>' (kinds: exit, hang, nan, shape, tamper,
    unsigned, replay, wrongkey, unknown)."""
    spec = str(context.node_config.get("fault", ""))
    if "@" not in spec:
        return ""
    kind, r = spec.split("@", 1)
    return kind if int(r) == round_ else ""


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from patchlm.federated.flower.strategy import history_from_record
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
    globals_rec = msg.content["globals"]
    history_sd = globals_rec.to_torch_state_dict() if len(globals_rec) else {}
    verify_s = 0.0
    if cfg.sign != "none":  # the server's broadcast must carry a valid signature from the registry's server key
        t0 = time.perf_counter()
        reg = KeyRegistry.load(str(nc["registry"]))
        scheme, pk = reg.get("server") or (None, None)
        sig = cfgrec.get("broadcast-signature")
        ctx = update_context(cfg.run_id, r, "server", 0, role="broadcast")
        if pk is None or not sig or not verify(scheme, pk, signed_message(history_sd, ctx), bytes(sig)):
            raise PermissionError(f"{cid}: the server's broadcast for round {r} is unsigned or its signature is invalid")
        verify_s = time.perf_counter() - t0
    if fault == "exit":  # disconnect for real: stop this client's SuperNode mid-round
        import psutil

        for p in psutil.Process().parents():
            if any("flower-supernode" in part for part in p.cmdline()):
                p.terminate()
        time.sleep(60)
    if fault == "hang":
        time.sleep(3600)
    with _file_lock(nc.get("lock")):
        history = history_from_record(globals_rec) if len(globals_rec) else []
        base = load_model(cfg, history)
        if nc.get("data"):
            from patchlm.data import load_task

            task = load_task(str(nc["data"]), seed=cfg.seed)
            examples = task.train
        else:
            task = load_fed_task(cfg)
            examples = client_examples(task, cfg, k)
        tensors, metrics = local_train(base, cfg, k, r, examples, task)
    n = len(examples)
    if fault == "nan":
        first = sorted(tensors)[1]
        tensors[first][0, 0] = float("nan")
    if fault == "shape":
        first = next(x for x in sorted(tensors) if x.endswith("lora_A"))
        tensors[first] = torch.zeros(tensors[first].shape[0], tensors[first].shape[1] + 1)
    meta = ConfigRecord({"client-id": cid, "run-id": cfg.run_id, "round": r, "num-samples": n,
                         "alpha": float(metrics["alpha"])})
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
