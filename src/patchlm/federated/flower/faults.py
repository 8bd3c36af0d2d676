"""TEST-ONLY fault injection: makes a ClientApp behave like a broken or malicious client, so the tests can check
that the server drops its update with the right reason (tests/test_federated_flower.py).

Enabled by one node-config key, `fault = "<kind>@<round>"` (patchlm.federated.flower.run.federate(faults=...)
sets it), which the ClientApp reads in one place. Never set it in a real deployment. The faults act around the
ordinary client round, which stays unaware of them:
  before the round   exit (the SuperNode stops mid-round), hang, nocache (the node's history cache is lost)
  on the reply       nan, shape (a bad tensor), tamper (a tensor changed after signing), unsigned, replay (the
                     update claims the previous round), wrongkey (signed by a key not in the registry), unknown
                     (signed under a client id the registry does not know), diverge (seed aggregations: the
                     client reports, signed, the hash of another model than the replay should give)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

import torch
from flwr.app import Context, Message

from patchlm.federated.flower.history import cache_dir
from patchlm.federated.flower.wire import read_broadcast, read_reply, reply_content
from patchlm.federated.signing import KeyPair, sign_tensors, update_context

KINDS = ("exit", "hang", "nocache", "nan", "shape", "tamper", "unsigned", "replay", "wrongkey", "unknown",
         "diverge")


def fault_for(node_config, round_: int) -> str:
    """The fault kind this node injects in `round_` ('' for none)."""
    spec = str(node_config.get("fault", ""))
    if "@" not in spec:
        return ""
    kind, r = spec.split("@", 1)
    if kind not in KINDS:
        raise ValueError(f"unknown test fault {kind!r}; choices: {', '.join(KINDS)}")
    return kind if int(r) == round_ else ""


def _stop_supernode() -> None:
    """Disconnect for real: stop this client's SuperNode process mid-round."""
    import psutil

    for p in psutil.Process().parents():
        if any("flower-supernode" in part for part in p.cmdline()):
            p.terminate()
    time.sleep(60)


def _resign(reply, key: KeyPair) -> None:
    sig, _ = sign_tensors(key, reply.tensors, update_context(reply.run_id, reply.round, reply.client_id,
                                                             reply.num_samples, alpha=reply.alpha))
    reply.signature, reply.scheme = sig, key.scheme


def with_fault(train: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """Run the ordinary client round `train`, altered by this node's fault for this round (if any)."""
    b = read_broadcast(msg.content)
    nc = context.node_config
    kind = fault_for(nc, b.round)
    cid = str(nc.get("client-id", f"client-{int(nc.get('partition-id', 0))}"))
    if kind == "exit":
        _stop_supernode()
    if kind == "hang":
        time.sleep(3600)
    if kind == "nocache":
        shutil.rmtree(cache_dir(nc, str(b.fed.get("run_id", "")), cid), ignore_errors=True)
    out = train(msg, context)
    if kind in ("", "exit", "hang", "nocache") or out.has_error():
        return out
    reply, _ = read_reply(out.content)
    names = sorted(reply.tensors)
    floats = [x for x in names[1:] + names[:1] if reply.tensors[x].is_floating_point()]  # LoRA: the first B
    if kind == "nan":
        reply.tensors[floats[0]].view(-1)[0] = float("nan")
    elif kind == "shape":
        name = next(x for x in sorted(reply.tensors) if x.endswith("lora_A"))
        a = reply.tensors[name]
        reply.tensors[name] = torch.zeros(a.shape[0], a.shape[1] + 1)
    elif kind == "tamper":
        name = next((x for x in names if x.endswith("lora_B")), floats[0])
        reply.tensors[name] = reply.tensors[name] + 1e-3
    elif kind == "diverge":
        h = reply.tensors["replay-hash"].clone()
        h[0] ^= 0xFF
        reply.tensors["replay-hash"] = h
        _resign(reply, KeyPair.load(str(nc["key-file"])))
    elif kind == "unsigned":
        reply.signature = reply.scheme = None
    elif kind == "replay":  # last round's signed update, sent again
        reply.round -= 1
        _resign(reply, KeyPair.load(str(nc["key-file"])))
    elif kind == "wrongkey":
        _resign(reply, KeyPair.generate(reply.scheme or "mldsa"))
    elif kind == "unknown":
        reply.client_id = f"{cid}-impostor"
        _resign(reply, KeyPair.load(str(nc["key-file"])))
    return Message(content=reply_content(reply), reply_to=msg)
