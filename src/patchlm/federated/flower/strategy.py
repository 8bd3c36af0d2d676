"""The Flower Strategy of patchlm: broadcasts the global LoRA history (signed), collects client LoRA updates,
drops the bad ones with a logged reason, aggregates the rest with a rule from patchlm.federated.rules, merges the
global update into the server's model, evaluates, and persists every round so a restarted server resumes.

Run directory:
  federate.json                 the run's FedConfig (and run id)
  keys/                         registry.json (public keys), server.key, client-<k>.key (local deployments)
  round-<r>/client-<k>/patch    each accepted client update (LoRA patch; num_samples in metrics and spec)
  round-<r>/global/patch        the round's global update (scaling 1: dW = B A), aggregation error in metrics;
                                under --protocol continue the whole global adapter after round r
  state.json                    the last completed round (written after its global patch)
  log.jsonl                     one record per round: accuracy, aggregation error, bytes, times, rejections
  final/patch                   every round's global stacked into one LoRA patch (= the total merged update)

Broadcast: each round's message carries the digests (SHA3-512) of every previous global update, signed once by
the server, and the tensors of the rounds the node does not hold yet. A client keeps the rounds it has verified
in a local cache and reports how many it holds; with --broadcast delta (the default) the server then sends only
the newer rounds, so the downlink stays one global update per round instead of the whole history. A client whose
cache lost rounds answers "history cache miss" and the server resends it the whole history within the round.
--broadcast full always sends the whole history (stateless clients).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from patchlm.federated.config import FedConfig
from patchlm.federated.flower.task import (
    evaluate_model,
    init_lora_tensors,
    load_fed_task,
    load_model,
    merged_rounds,
    write_json,
)
from patchlm.federated.flower.wire import (
    CACHE_MISS,
    broadcast_config,
    broadcast_message,
    read_reply,
    reply_history_rounds,
)
from patchlm.federated.privacy import total_epsilon
from patchlm.federated.rules import (
    aggregate,
    aggregation_error,
    merge_tensors_into_model,
    stack_rounds,
    update_from_tensors,
)
from patchlm.federated.signing import (
    KeyPair,
    KeyRegistry,
    UpdateVerifier,
    broadcast_context,
    round_digest,
    sign_tensors,
)
from patchlm.patch import Patch, provenance


class PatchlmStrategy(Strategy):
    """Federated LoRA with a pluggable aggregation rule, signed updates and per-round persistence."""

    def __init__(self, cfg: FedConfig, out: str | Path, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.registry = None
        self.server_key = None
        if cfg.sign != "none":
            self.registry = KeyRegistry.load(self.out / "keys" / "registry.json")
            self.server_key = KeyPair.load(self.out / "keys" / "server.key")
        self.verifier = UpdateVerifier(self.registry, cfg.run_id) if self.registry else None
        self.history: list[dict[str, torch.Tensor]] = []
        self.digests: list[str] = []  # one per completed round's global update
        self.node_has: dict[int, int] = {}  # Flower node id -> global rounds it reported holding
        self.node_names: dict[int, str] = {}  # Flower node id -> client id, learnt from verified updates
        self.base = None
        self.task = None

    # ---------------------------------------------------------------- persistence
    def completed_round(self) -> int:
        f = self.out / "state.json"
        return int(json.loads(f.read_text())["completed_round"]) if f.exists() else 0

    def load_history(self, upto: int) -> None:
        self.history = [Patch.load(self.out / f"round-{r}" / "global" / "patch").tensors for r in range(1, upto + 1)]
        self.digests = [round_digest(t) for t in self.history]

    def _log(self, rec: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")

    # ---------------------------------------------------------------- Strategy API
    def summary(self) -> None:
        c = self.cfg
        self.log(f"patchlm strategy: {c.aggregation}, {c.clients} clients, ranks {c.ranks}, {c.rounds} rounds, "
                 f"signing {c.sign}, dp {c.dp}, min clients {c.min_clients}, protocol {c.protocol}, "
                 f"broadcast {c.broadcast}")

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per node: the signed digest list plus the global rounds that node does not hold yet
        (`arrays` and `config` are ignored: the history and the run's FedConfig live in the strategy)."""
        node_ids = sorted(grid.get_node_ids())
        self._sign_seconds = 0.0
        sig = None
        if self.server_key is not None:
            sig, self._sign_seconds = sign_tensors(self.server_key, {}, broadcast_context(self.cfg.run_id,
                                                                                         server_round, self.digests))
        self._config = broadcast_config(server_round, self.cfg.to_json(), self.digests, sig,
                                        self.server_key.scheme if self.server_key is not None else None)
        self._down: dict[int, int] = {}
        return [self.message_for(n) for n in node_ids]

    def message_for(self, node: int, full: bool = False) -> Message:
        """The round's broadcast to one node (the whole history when `full` or --broadcast full)."""
        if self.cfg.protocol == "continue":  # clients need only the current global adapter
            have = max(0, len(self.history) - 1)
        else:
            have = 0 if full or self.cfg.broadcast == "full" else min(self.node_has.get(node, 0), len(self.history))
        msg, size = broadcast_message(self._config, self.history, have + 1, node)
        self._down[node] = self._down.get(node, 0) + size
        return msg

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        cfg = self.cfg
        expected = {k: tuple(v.shape[1:]) if k.endswith("lora_A") else tuple(v.shape[:1])
                    for k, v in init_lora_tensors(self.base.model, cfg.targets, 1, 0).items()}
        accepted, rejected, per_client = [], [], []
        verify_s = 0.0
        for msg in replies:
            node = msg.metadata.src_node_id
            if not msg.has_error() and "meta" in msg.content:
                # how many global rounds the node holds now (it verified and cached them)
                self.node_has[node] = reply_history_rounds(msg.content)
            if msg.has_error():
                known = self.node_names.get(node)
                rejected.append({"node": node, **({"client_node": known} if known else {}),
                                 "reason": f"client error: {msg.error.reason[:300]}"})
                continue
            try:
                reply, up_bytes = read_reply(msg.content)
            except (KeyError, ValueError, TypeError) as e:
                rejected.append({"node": node, "reason": f"malformed reply: {e}"})
                continue
            cid, tensors, metrics, claimed = reply.client_id, reply.tensors, reply.metrics, reply.claimed()
            reason = _check_tensors(tensors, expected)
            if reason is None and self.verifier is not None:
                v = self.verifier.check(tensors, claimed, reply.signature, server_round)
                verify_s += v.seconds
                reason = None if v.ok else v.reason
            if reason is None and claimed["num_samples"] <= 0:
                reason = f"num_samples {claimed['num_samples']} is not a positive count"
            if reason is None and cid in {a[0] for a in accepted}:
                reason = f"a second update from {cid} in this round"
            if reason is not None:
                rejected.append({"node": node, "client_id": cid, "reason": reason})
                self.log(f"round {server_round}: dropped update from {cid}: {reason}")
                continue
            r_k = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_A"))
            metrics.update({"rank": r_k, "alpha": claimed["alpha"]})  # the signed values, not the metrics JSON
            if not claimed["alpha"] > 0:
                rejected.append({"node": node, "client_id": cid,
                                 "reason": f"LoRA alpha {claimed['alpha']} is not positive"})
                continue
            accepted.append((cid, tensors, metrics, claimed["num_samples"], up_bytes))
            self.node_names[node] = cid
            per_client.append({"client_id": cid, "bytes_up": up_bytes, "bytes_down": self._down.get(node, 0),
                               "num_samples": claimed["num_samples"], "rank": metrics.get("rank"),
                               "train_loss": metrics.get("train_loss"), "train_seconds": metrics.get("train_seconds"),
                               "sign_seconds": metrics.get("sign_seconds", 0.0),
                               "signature_bytes": metrics.get("signature_bytes"),
                               "verify_broadcast_seconds": metrics.get("verify_seconds", 0.0),
                               "dp": metrics.get("dp")})
        self._round_info = {"rejected": rejected, "clients": per_client, "verify_seconds": verify_s}
        if len(accepted) < cfg.min_clients:
            self._round_info["failed"] = (f"only {len(accepted)} valid updates, min_clients is {cfg.min_clients}")
            return None, None
        accepted.sort(key=lambda a: _natural(a[0]))  # a fixed order: the stacked global is reproducible from disk
        per_client.sort(key=lambda c: _natural(c["client_id"]))
        self._save_clients(server_round, accepted)
        updates = [update_from_tensors(t, m["alpha"] / m["rank"], n, cid) for cid, t, m, n, _ in accepted]
        g = aggregate(cfg.aggregation, updates)
        err = aggregation_error(g, updates)
        self._round_info.update({"aggregation_error": err, "global_rank": max(g.rank.values()),
                                 "weights": {u.client_id: w for u, w in zip(updates, g.weights, strict=True)}})
        tensors = g.tensors()
        return ArrayRecord({k: v for k, v in tensors.items()}), MetricRecord({"aggregation-error": float(err)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    # ---------------------------------------------------------------- saving
    def _save_clients(self, server_round: int, accepted) -> None:
        for cid, tensors, metrics, n, _ in accepted:
            spec = {"r": metrics["rank"], "alpha": metrics["alpha"], "dropout": 0.0,
                    "targets": sorted({k.rsplit(".", 1)[0] for k in tensors}), "num_samples": n}
            m = {k: v for k, v in metrics.items() if k != "dp"}
            if metrics.get("dp"):
                m["dp"] = metrics["dp"]
            Patch("lora", self.base.ref(), spec, tensors,
                  provenance(federated={"run_id": self.cfg.run_id, "round": server_round, "client_id": cid,
                                        "aggregation": self.cfg.aggregation}),
                  metrics={**m, "num_samples": n}).save(self.out / f"round-{server_round}" / cid / "patch", force=True)

    def _save_global(self, server_round: int, tensors: dict, info: dict, metrics: dict) -> None:
        spec = {"r": max(info["global_rank"], 1), "alpha": 1.0, "scaling": 1.0, "dropout": 0.0,
                "targets": sorted({k.rsplit(".", 1)[0] for k in tensors}), "aggregation": self.cfg.aggregation,
                "num_samples": sum(c["num_samples"] for c in info["clients"])}
        Patch("lora", self.base.ref(), spec, tensors,
              provenance(federated={"run_id": self.cfg.run_id, "round": server_round, "rule": self.cfg.aggregation,
                                    "clients": [c["client_id"] for c in info["clients"]]}),
              metrics={"aggregation_error": info["aggregation_error"], "weights": info["weights"],
                       "num_samples": spec["num_samples"], **metrics}
              ).save(self.out / f"round-{server_round}" / "global" / "patch", force=True)

    def _save_final(self) -> None:
        if not self.history:
            return
        st = stack_rounds(merged_rounds(self.cfg, self.history))
        ranks = {v.shape[0] for k, v in st.items() if k.endswith("lora_A")}
        Patch("lora", self.base.ref(), {"r": max(ranks), "alpha": 1.0, "scaling": 1.0, "dropout": 0.0,
                                        "targets": sorted({k.rsplit(".", 1)[0] for k in st})}, st,
              provenance(federated={"run_id": self.cfg.run_id, "rounds": len(self.history),
                                    "rule": self.cfg.aggregation}),
              metrics={"rounds": len(self.history)}).save(self.out / "final" / "patch", force=True)

    # ---------------------------------------------------------------- the loop
    def _collect(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Push, then pull until every node answered, the round timeout, or (once min_clients answered) the
        straggler timeout; a node that left the federation counts as answered (with no update)."""
        cfg = self.cfg
        by_id = {}
        ids = list(grid.push_messages(messages))
        for mid, m in zip(ids, messages, strict=True):
            by_id[mid] = m.metadata.dst_node_id
        pending = set(ids)
        replies: list[Message] = []
        t0 = time.time()
        t_min = None
        resent: set[int] = set()
        while pending:
            for m in grid.pull_messages(list(pending)):
                pending.discard(m.metadata.reply_to_message_id)
                node = by_id[m.metadata.reply_to_message_id]
                if m.has_error() and CACHE_MISS in (m.error.reason or "") and node not in resent:
                    resent.add(node)  # the node lost its cached rounds: send it the whole history, once
                    self.node_has.pop(node, None)
                    self.log(f"node {node} lost its history cache: resending the whole history")
                    full = self.message_for(node, full=True)
                    for mid in grid.push_messages([full]):
                        by_id[mid] = node
                        pending.add(mid)
                    continue
                replies.append(m)
            if not pending:
                break
            ok = sum(1 for m in replies if not m.has_error())
            now = time.time()
            if ok >= cfg.min_clients and t_min is None:
                t_min = now
            online = set(grid.get_node_ids())
            gone = {mid for mid in pending if by_id[mid] not in online}
            if gone:
                for mid in gone:
                    self.log(f"node {by_id[mid]} left the federation during the round")
                pending -= gone
                self._gone.extend(by_id[mid] for mid in gone)
            if now - t0 > cfg.round_timeout:
                self.log(f"round timeout ({cfg.round_timeout:.0f} s): {len(pending)} clients did not answer")
                break
            if t_min is not None and cfg.straggler_timeout is not None and now - t_min > cfg.straggler_timeout:
                self.log(f"{len(pending)} stragglers dropped after {cfg.straggler_timeout:.0f} s")
                break
            time.sleep(0.5)
        self._missing = len(pending)
        self._resent = sorted(resent)
        return replies

    def _wait_for_nodes(self, grid: Grid, n: int, timeout: float) -> None:
        t0 = time.time()
        while len(list(grid.get_node_ids())) < n:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {n} clients connected in {timeout:.0f} s")
            time.sleep(0.5)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config=None, evaluate_config=None, evaluate_fn=None):
        """Run rounds completed+1 .. cfg.rounds (a restarted server resumes after the last completed round)."""
        cfg = self.cfg
        done = self.completed_round()
        self.load_history(done)
        self.base = load_model(cfg, self.history)
        self.task = load_fed_task(cfg)
        self.summary()
        if done:
            self.log(f"resuming after round {done}")
            self._log({"event": "resume", "completed_round": done, "time": time.time()})
        elif cfg.eval_limit:
            m = evaluate_model(self.base, self.task, cfg)
            self._log({"event": "round", "round": 0, **_prefix(m, "eval_")})
        self._wait_for_nodes(grid, cfg.min_clients, min(cfg.round_timeout, 600))
        for r in range(done + 1, cfg.rounds + 1):
            t_round = time.time()
            self._gone = []
            msgs = list(self.configure_train(r, None, ConfigRecord(), grid))
            replies = self._collect(grid, msgs)
            agg, _ = self.aggregate_train(r, replies)
            info = self._round_info
            info.update({"disconnected_nodes": self._gone, "missing": self._missing,
                         "broadcast_sign_seconds": self._sign_seconds, "resent_full_history": self._resent})
            if agg is None:
                self._log({"event": "round_failed", "round": r, **info, "time": time.time()})
                raise RuntimeError(f"round {r} failed: {info.get('failed')}; the run can resume with --resume")
            tensors = agg.to_torch_state_dict()
            t_eval = time.time()
            if cfg.protocol == "continue" and self.history:  # the new global adapter replaces the previous one
                merge_tensors_into_model(self.base.model, self.history[-1], scaling=-1.0)
            merge_tensors_into_model(self.base.model, tensors)
            m = evaluate_model(self.base, self.task, cfg)
            eval_s = time.time() - t_eval
            round_s = time.time() - t_round
            self._save_global(r, tensors, info, _prefix(m, "eval_"))
            self.history.append(tensors)
            self.digests.append(round_digest(tensors))
            write_json(self.out / "state.json", {"completed_round": r, "run_id": cfg.run_id})
            clients = info["clients"]
            rec = {"event": "round", "round": r, "round_time_s": round_s - eval_s, "eval_seconds": eval_s,
                   "bytes_up": sum(c["bytes_up"] for c in clients),
                   "bytes_down": sum(self._down.values()),
                   "bytes_down_per_client": sum(self._down.values()) / max(1, len(self._down)),
                   "sign_seconds_clients": sum(c["sign_seconds"] or 0 for c in clients),
                   "verify_seconds": info["verify_seconds"],
                   "verify_broadcast_seconds": sum(c["verify_broadcast_seconds"] or 0 for c in clients),
                   "max_client_train_seconds": max((c["train_seconds"] or 0) for c in clients),
                   **{k: v for k, v in info.items() if k not in ("verify_seconds",)}, **_prefix(m, "eval_"),
                   "time": time.time()}
            if cfg.dp:
                rec["dp_epsilon_total"] = self._dp_totals()
            self._log(rec)
            self.log(f"round {r}: {len(clients)} updates, {len(info['rejected'])} rejected, "
                     f"aggregation error {info['aggregation_error']:.3g}"
                     + (f", accuracy {m['accuracy']:.3f}" if "accuracy" in m else ""))
            if os.environ.get("PATCHLM_FED_CRASH_AFTER_ROUND") == str(r):  # test hook: a server crash
                raise RuntimeError(f"injected server crash after round {r}")
        self._save_final()
        write_json(self.out / "state.json", {"completed_round": cfg.rounds, "run_id": cfg.run_id, "finished": True})

    def _dp_totals(self) -> dict:
        """Total epsilon per client over all completed rounds (RDP composition of the logged rounds)."""
        hist: dict[str, list] = {}
        deltas: dict[str, float] = {}
        logf = self.out / "log.jsonl"
        recs = [json.loads(line) for line in logf.read_text().splitlines() if line] if logf.exists() else []
        recs.append({"event": "round", "clients": self._round_info["clients"]})
        for rec in recs:
            for c in rec.get("clients", []) if rec.get("event") == "round" else []:
                dp = c.get("dp") or {}
                if dp:
                    hist.setdefault(c["client_id"], []).append((dp["noise_multiplier"], dp["sample_rate"], dp["steps"]))
                    deltas[c["client_id"]] = dp["delta"]
        return {cid: total_epsilon(h, deltas[cid]) for cid, h in sorted(hist.items())}


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _prefix(m: dict, p: str) -> dict:
    return {p + k: v for k, v in m.items()}


def _check_tensors(tensors: dict, expected: dict) -> str | None:
    """None when every LoRA tensor has the model's shape and finite values, else the reason to drop it."""
    if not tensors:
        return "empty update"
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        return f"wrong tensors: unexpected {extra[:2]} missing {missing[:2]}"
    ranks = set()
    for k, v in tensors.items():
        if k.endswith("lora_A"):
            if tuple(v.shape[1:]) != expected[k] or v.dim() != 2:
                return f"wrong shape {tuple(v.shape)} for {k} (expected r x {expected[k][0]})"
            bname = k[: -len("lora_A")] + "lora_B"
            b = tensors[bname]
            if b.dim() != 2 or tuple(b.shape[:1]) != expected[bname] or b.shape[1] != v.shape[0]:
                return f"wrong shape {tuple(b.shape)} for the B of {k[:-7]} (A is {tuple(v.shape)})"
            ranks.add(v.shape[0])
        if not torch.isfinite(v).all():
            return f"non-finite values (NaN or inf) in {k}"
    if len(ranks) != 1:
        return f"mixed ranks {sorted(ranks)} inside one update"
    return None

