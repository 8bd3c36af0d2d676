"""The ClientApp's side of the seed-based aggregations (fedkseed, ferret): verify the broadcast (the signed digests
of every previous round's aggregated scalars, patchlm.federated.flower.history), replay the model from theta_0,
train locally, and reply with the scalars plus the hash of the replayed model (signed together), so the server
can tell a client whose replay diverged. The final check (an evaluate message after the last round) replays the
last round too and returns only the hash.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message

from patchlm.federated.config import FedConfig
from patchlm.federated.flower.history import accept_broadcast, cache_dir
from patchlm.federated.flower.seed_task import SeedModel, seed_local_train
from patchlm.federated.flower.task import client_examples, load_fed_task, load_model
from patchlm.federated.flower.wire import Broadcast, Reply, reply_content
from patchlm.federated.seeds import state_hash
from patchlm.federated.signing import KeyPair, KeyRegistry, sign_tensors, update_context

HASH_KEY = "replay-hash"  # the reply tensor carrying the SHA3-512 of the client's replayed model (uint8[64])


def hash_tensor(h: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8).clone()


def hash_hex(t: torch.Tensor) -> str:
    return t.detach().cpu().contiguous().numpy().tobytes().hex()


def node_examples(nc, cfg: FedConfig, k: int):
    """(task, this node's training examples): node config `data` (a local file) or partition k of the task."""
    if nc.get("data"):
        from patchlm.data import load_task

        task = load_task(str(nc["data"]), seed=cfg.seed)
        return task, task.train
    task = load_fed_task(cfg)
    return task, client_examples(task, cfg, k)


def _history(b: Broadcast, cfg: FedConfig, nc, cid: str) -> tuple[list, float]:
    t0 = time.perf_counter()
    registry = KeyRegistry.load(str(nc["registry"])) if cfg.sign != "none" else None
    history = accept_broadcast(b, cfg.run_id, "merge", cache_dir(nc, cfg.run_id, cid), registry, who=cid)
    return history, time.perf_counter() - t0


def _sign(reply: Reply, cfg: FedConfig, nc, metrics: dict) -> None:
    if cfg.sign == "none":
        return
    key = KeyPair.load(str(nc["key-file"]))
    sig, secs = sign_tensors(key, reply.tensors, update_context(cfg.run_id, reply.round, reply.client_id,
                                                                reply.num_samples, alpha=reply.alpha))
    reply.signature, reply.scheme = sig, key.scheme
    metrics["sign_seconds"] = secs
    metrics["signature_bytes"] = len(sig)


def seed_client_round(msg: Message, context: Context, b: Broadcast, cfg: FedConfig, lock) -> Message:
    """One training round of one client (fedkseed or ferret)."""
    nc = context.node_config
    k = int(nc.get("partition-id", 0))
    cid = str(nc.get("client-id", f"client-{k}"))
    history, verify_s = _history(b, cfg, nc, cid)
    with lock(nc.get("lock")):
        base = load_model(cfg)
        sm = SeedModel(base, cfg)
        state, rinfo = sm.replay(history)
        h = state_hash(state)
        task, examples = node_examples(nc, cfg, k)
        update, metrics = seed_local_train(sm, cfg, k, b.round, examples, task, history)
    reply = Reply(client_id=cid, run_id=cfg.run_id, round=b.round, num_samples=len(examples), alpha=0.0,
                  tensors={**update, HASH_KEY: hash_tensor(h)}, history_rounds=len(history))
    metrics.update({**rinfo, "verify_seconds": verify_s, "model_hash": h})
    _sign(reply, cfg, nc, metrics)
    reply.metrics = metrics
    return Message(content=reply_content(reply), reply_to=msg)


def final_check_round(msg: Message, context: Context, b: Broadcast, cfg: FedConfig, lock) -> Message:
    """After the last round: replay every round and return the model's hash (signed), nothing else."""
    nc = context.node_config
    k = int(nc.get("partition-id", 0))
    cid = str(nc.get("client-id", f"client-{k}"))
    history, verify_s = _history(b, cfg, nc, cid)
    with lock(nc.get("lock")):
        sm = SeedModel(load_model(cfg), cfg)
        state, rinfo = sm.replay(history)
    h = state_hash(state)
    reply = Reply(client_id=cid, run_id=cfg.run_id, round=b.round, num_samples=0, alpha=0.0,
                  tensors={HASH_KEY: hash_tensor(h)}, history_rounds=len(history))
    metrics = {**rinfo, "verify_seconds": verify_s, "model_hash": h}
    _sign(reply, cfg, nc, metrics)
    reply.metrics = metrics
    return Message(content=reply_content(reply), reply_to=msg)
