"""The Flower ClientApp: verifies the server's signed broadcast, merges the global history into its base,
trains a LoRA on its own data partition (plain or DP-SGD), signs the update and replies.

The broadcast carries the digest of every previous global update (signed by the server) and the tensors of the
rounds this node does not hold yet; the node keeps verified rounds in its history cache and reports how many it
holds, so later broadcasts carry only the new rounds (patchlm.federated.flower.history). Records on the wire:
patchlm.federated.flower.wire. Data, model and training: patchlm.federated.flower.task.

Node config (flower-supernode --node-config): partition-id, num-partitions, key-file (this client's private
key), registry (public keys, for the server's key), optional data (a local data file instead of a partition of a
built-in task), client-id, lock (a file lock so clients on one machine train one at a time), history-cache (a
directory [$PATCHLM_HOME/fed-cache]) and, for tests only, fault (see patchlm.federated.flower.faults).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from patchlm.federated.config import SEED_AGGREGATIONS, FedConfig
from patchlm.federated.flower import faults
from patchlm.federated.flower.history import accept_broadcast, cache_dir
from patchlm.federated.flower.seed_client import final_check_round, node_examples, seed_client_round
from patchlm.federated.flower.task import load_model, local_train
from patchlm.federated.flower.wire import Reply, read_broadcast, reply_content
from patchlm.federated.signing import KeyPair, KeyRegistry, sign_tensors, update_context

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


def client_round(msg: Message, context: Context) -> Message:
    """One round of one client: verify the broadcast, merge the history, train, sign, reply."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    b = read_broadcast(msg.content)
    cfg = FedConfig.from_dict(b.fed)
    if cfg.aggregation in SEED_AGGREGATIONS:  # seeds and scalars instead of LoRA tensors
        return seed_client_round(msg, context, b, cfg, _file_lock)
    nc = context.node_config
    k = int(nc.get("partition-id", 0))
    cid = str(nc.get("client-id", f"client-{k}"))
    t0 = time.perf_counter()
    registry = KeyRegistry.load(str(nc["registry"])) if cfg.sign != "none" else None
    history = accept_broadcast(b, cfg.run_id, cfg.protocol, cache_dir(nc, cfg.run_id, cid), registry, who=cid)
    verify_s = time.perf_counter() - t0  # the broadcast signature and the received (and cached) rounds' digests
    with _file_lock(nc.get("lock")):
        base = load_model(cfg, history)
        task, examples = node_examples(nc, cfg, k)
        start_from = history[-1] if cfg.protocol == "continue" and history else None
        tensors, metrics = local_train(base, cfg, k, b.round, examples, task, start=start_from)
    reply = Reply(client_id=cid, run_id=cfg.run_id, round=b.round, num_samples=len(examples),
                  alpha=float(metrics["alpha"]), tensors=tensors,
                  history_rounds=len(history) if cfg.protocol == "merge" else 0)
    if cfg.sign != "none":
        key = KeyPair.load(str(nc["key-file"]))
        sig, secs = sign_tensors(key, tensors, update_context(cfg.run_id, b.round, cid, reply.num_samples,
                                                              alpha=reply.alpha))
        reply.signature, reply.scheme = sig, key.scheme
        metrics["sign_seconds"] = secs
        metrics["signature_bytes"] = len(sig)
    metrics["verify_seconds"] = verify_s
    reply.metrics = metrics
    return Message(content=reply_content(reply), reply_to=msg)


def final_check(msg: Message, context: Context) -> Message:
    """Seed aggregations, after the last round: the hash of this node's replayed final model."""
    b = read_broadcast(msg.content)
    return final_check_round(msg, context, b, FedConfig.from_dict(b.fed), _file_lock)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if "fault" in context.node_config:  # TEST-ONLY: simulate a broken or malicious client (see faults.py)
        return faults.with_fault(client_round, msg, context)
    return client_round(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if "fault" in context.node_config:
        return faults.with_fault(final_check, msg, context)
    return final_check(msg, context)
