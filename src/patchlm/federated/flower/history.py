"""A client's view of the global history: it checks the server's signed broadcast, then assembles the global
updates of every previous round from the broadcast and its own cache, each verified against the signed digest,
before anything is merged into its model. These checks carry the protocol's security weight, so they are plain
functions, unit-tested without a Flower run.

Cache: one safetensors file per verified round, `<cache>/round-<r>.safetensors`, under
`<history-cache or $PATCHLM_HOME/fed-cache>/<run id>/<client id>`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from patchlm.federated.flower.wire import CACHE_MISS, Broadcast
from patchlm.federated.signing import KeyRegistry, broadcast_context, round_digest, signed_message, verify
from patchlm.paths import atomic_write_bytes, home


def cache_dir(node_config, run_id: str, client_id: str) -> Path:
    """The node's history cache for this run and client (node config `history-cache`, else under PATCHLM_HOME)."""
    root = Path(str(node_config["history-cache"])) if node_config.get("history-cache") else home() / "fed-cache"
    return root / run_id / client_id


def cache_save(cache: Path, round_: int, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(cache / f"round-{round_}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}),
                       mode=0o644)


def check_signature(b: Broadcast, run_id: str, registry: KeyRegistry, who: str = "client") -> None:
    """The broadcast must be signed, for this run and round and this digest list, by the registry's server key."""
    scheme, pk = registry.get("server") or (None, None)
    message = signed_message({}, broadcast_context(run_id, b.round, b.digests))
    if pk is None or not b.signature or not verify(scheme, pk, message, b.signature):
        raise PermissionError(f"{who}: the server's broadcast for round {b.round} is unsigned or its signature is "
                              "invalid")


def latest_global(received: dict, digests: list[str]) -> list:
    """Continue protocol: only the last global adapter is needed; it must match its signed digest."""
    if not digests:
        return []
    if sorted(received) != [len(digests)]:
        raise PermissionError(f"the broadcast carries rounds {sorted(received)}, expected the last one "
                              f"({len(digests)})")
    t = received[len(digests)]
    if round_digest(t) != digests[-1]:
        raise PermissionError(f"the broadcast's round {len(digests)} does not match the signed digest")
    return [t]


def assemble_history(received: dict, digests: list[str], start: int, cache: Path) -> list:
    """Every previous global round, verified against the signed digests: rounds < start come from the node's
    cache (a missing or altered one raises the cache-miss error, so the server resends the whole history),
    rounds >= start from the broadcast (an altered one is refused), and the new ones are added to the cache."""
    if sorted(received) != list(range(start, len(digests) + 1)):
        raise PermissionError(f"the broadcast carries rounds {sorted(received)}, expected {start}..{len(digests)}")
    history = []
    for r in range(1, len(digests) + 1):
        if r < start:
            f = cache / f"round-{r}.safetensors"
            t = load_file(str(f)) if f.exists() else None
            if t is None or round_digest(t) != digests[r - 1]:
                if f.exists():
                    f.unlink()
                raise RuntimeError(f"{CACHE_MISS}: round {r} is not in {cache} (or does not match its digest)")
        else:
            t = received[r]
            if round_digest(t) != digests[r - 1]:
                raise PermissionError(f"the broadcast's round {r} does not match the signed digest")
            cache_save(cache, r, t)
        history.append(t)
    return history


def accept_broadcast(b: Broadcast, run_id: str, protocol: str, cache: Path,
                     registry: KeyRegistry | None = None, who: str = "client") -> list:
    """The verified global history a client merges: the signature first (when `registry`), then every round.

    Merge protocol: every previous round (assemble_history); continue protocol: only the last (latest_global)."""
    if registry is not None:
        check_signature(b, run_id, registry, who)
    if protocol == "continue":
        return latest_global(b.received, b.digests)
    return assemble_history(b.received, b.digests, b.start, cache)
