"""The wire protocol of patchlm's Flower apps: how a round's broadcast and a client's reply are packed into Flower
records and unpacked again. The server and the clients both use this module, so the record and key names live
in one place.

Broadcast (server -> node), a RecordDict:
  globals  ArrayRecord   the global tensors of rounds history-from..round-1, keys `<round>|<tensor name>`
  config   ConfigRecord  round, fed (the FedConfig as JSON), history-digests (JSON list: SHA3-512 hex of every
                         previous global update), history-from, and when signing broadcast-signature + scheme
Reply (node -> server), a RecordDict:
  arrays   ArrayRecord   the client's LoRA tensors
  meta     ConfigRecord  client-id, run-id, round, num-samples, alpha, history-rounds (rounds the node holds),
                         metrics-json, and when signing signature + scheme
  metrics  MetricRecord  num-examples, train-loss
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

CACHE_MISS = "history cache miss"  # a client's error reason when its cached rounds are gone: resend them all


# ---------------------------------------------------------------- the global history
def history_record(history: list[dict[str, torch.Tensor]], start: int = 1) -> ArrayRecord:
    """Previous rounds' global tensors from round `start` on, in one ArrayRecord, keys `<round>|<tensor name>`."""
    flat = {f"{i + 1}|{k}": v.contiguous() for i, t in enumerate(history) if i + 1 >= start
            for k, v in sorted(t.items())}
    return ArrayRecord(flat) if flat else ArrayRecord()


def history_rounds(rec: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
    """{round: tensors} from a history record (any subset of rounds)."""
    sd = rec.to_torch_state_dict() if len(rec) else {}
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        r, name = key.split("|", 1)
        out.setdefault(int(r), {})[name] = v
    return out


# ---------------------------------------------------------------- broadcast
def broadcast_config(round_: int, fed_json: str, digests: list[str], signature: bytes | None = None,
                     scheme: str | None = None) -> ConfigRecord:
    """The part of a round's broadcast that is the same for every node."""
    config = ConfigRecord({"round": round_, "fed": fed_json, "history-digests": json.dumps(list(digests))})
    if signature is not None:
        config["broadcast-signature"] = signature
        config["scheme"] = str(scheme)
    return config


def broadcast_content(config: ConfigRecord, history: list[dict[str, torch.Tensor]],
                      start: int) -> tuple[RecordDict, int]:
    """(a node's broadcast carrying the global rounds start.., its size in bytes)."""
    config = ConfigRecord(dict(config.items()))
    config["history-from"] = start
    arrays = history_record(history, start=start)
    return RecordDict({"globals": arrays, "config": config}), arrays.count_bytes() + config.count_bytes()


def broadcast_message(config: ConfigRecord, history: list[dict[str, torch.Tensor]], start: int,
                      node: int) -> tuple[Message, int]:
    """broadcast_content as the train message to `node`."""
    content, size = broadcast_content(config, history, start)
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node), size


@dataclass
class Broadcast:
    """A broadcast as a client reads it (nothing verified yet: see patchlm.federated.flower.history)."""

    round: int
    fed: dict
    digests: list[str]
    start: int
    received: dict[int, dict[str, torch.Tensor]]
    signature: bytes | None = None


def read_broadcast(content: RecordDict) -> Broadcast:
    config = content["config"]
    sig = config.get("broadcast-signature")
    return Broadcast(round=int(config["round"]), fed=json.loads(str(config["fed"])),
                     digests=json.loads(str(config.get("history-digests", "[]"))),
                     start=int(config.get("history-from", 1)), received=history_rounds(content["globals"]),
                     signature=bytes(sig) if sig else None)


# ---------------------------------------------------------------- reply
@dataclass
class Reply:
    """A client's update and the context it claims (the signed part: run, round, client, samples, alpha)."""

    client_id: str
    run_id: str
    round: int
    num_samples: int
    alpha: float
    tensors: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)
    history_rounds: int = 0
    signature: bytes | None = None
    scheme: str | None = None

    def claimed(self) -> dict:
        """The context the server verifies the signature against."""
        return {"run_id": self.run_id, "round": self.round, "client_id": self.client_id,
                "num_samples": self.num_samples, "scheme": self.scheme, "alpha": self.alpha}


def reply_content(reply: Reply) -> RecordDict:
    meta = ConfigRecord({"client-id": reply.client_id, "run-id": reply.run_id, "round": reply.round,
                         "num-samples": reply.num_samples, "alpha": float(reply.alpha),
                         "history-rounds": reply.history_rounds,
                         "metrics-json": json.dumps(reply.metrics, default=float)})
    if reply.signature is not None:
        meta["signature"] = reply.signature
        meta["scheme"] = str(reply.scheme)
    return RecordDict({"arrays": ArrayRecord({k: v.contiguous() for k, v in reply.tensors.items()}), "meta": meta,
                       "metrics": MetricRecord({"num-examples": reply.num_samples,
                                                "train-loss": float(reply.metrics.get("train_loss", float("nan")))})})


def reply_history_rounds(content: RecordDict) -> int:
    """How many global rounds the node reports holding (0 when absent or malformed)."""
    try:
        return int(content["meta"].get("history-rounds", 0))
    except (KeyError, TypeError, ValueError):
        return 0


def _whole(value, key: str) -> int:
    """An integer field of a record (ValueError for inf/NaN or a fraction, TypeError for bytes or a bool)."""
    if isinstance(value, (bool, bytes)):
        raise TypeError(f"reply field {key!r} is a {type(value).__name__}, not an integer")
    try:
        whole = int(value)
    except OverflowError:
        raise ValueError(f"reply field {key!r} is not finite") from None
    if isinstance(value, float) and whole != value:
        raise ValueError(f"reply field {key!r} is not an integer: {value}")
    return whole


def record_bytes(rec) -> int:
    """rec.count_bytes(), with flwr's IndexError on an empty list value turned into the malformed-record ValueError."""
    try:
        return rec.count_bytes()
    except IndexError:
        raise ValueError("a record holds an empty list value") from None


def read_reply(content: RecordDict) -> tuple[Reply, int]:
    """(the reply, its uplink size in bytes); KeyError / ValueError / TypeError on a malformed one."""
    meta = content["meta"]
    arrays = content["arrays"]
    lists = [k for k, v in meta.items() if isinstance(v, list)]
    if lists:
        raise TypeError(f"reply field {lists[0]!r} holds a list where one value belongs")
    sig = meta.get("signature")
    if sig is not None and not isinstance(sig, bytes):
        raise TypeError(f"reply signature is a {type(sig).__name__}, not bytes")
    if not isinstance(meta.get("scheme", ""), str):
        raise TypeError("reply scheme is not a name")
    metrics = json.loads(str(meta["metrics-json"]))
    if not isinstance(metrics, dict):
        raise TypeError("reply metrics-json is not a JSON object")
    reply = Reply(client_id=str(meta["client-id"]), run_id=str(meta.get("run-id", "")),
                  round=_whole(meta.get("round", -1), "round"), num_samples=_whole(meta.get("num-samples", 0),
                                                                                   "num-samples"),
                  alpha=float(meta.get("alpha", 0.0)), tensors=arrays.to_torch_state_dict(),
                  metrics=metrics, history_rounds=reply_history_rounds(content),
                  signature=bytes(sig) if sig else None, scheme=meta.get("scheme"))
    return reply, record_bytes(arrays) + record_bytes(meta)
