"""The Flower Strategy of the seed-based aggregations (fedkseed, ferret): PatchlmStrategy's broadcast, collection,
signing and resume, with seeds and scalars where the LoRA runs have tensors.

Each round the server broadcasts the signed digests of every previous round's aggregated scalars and the rounds
the node does not hold yet (delta broadcast, as for LoRA: a few KB per round); a client replies with its scalars
(fedkseed: the non-zero per-seed sums as (index, value) pairs; ferret: [tensors, bases] coefficients) and the hash
of the model it replayed, signed together and bound to run, round and client. The server drops a malformed,
non-finite, unsigned, tampered or replayed update, or one whose replay hash differs from the server's own model
hash (the client's replay diverged), with the reason; aggregates the rest weighted by data size; replays the
model from theta_0 and evaluates it. After the last round every node replays the final model and returns its
hash (an evaluate message): the run records whether all of them equal the server's.

Run directory (besides federate.json, keys/, state.json, log.jsonl as for LoRA runs):
  seeds.json                    fedkseed: the K candidate seeds of the run
  round-<r>/client-<k>/update   the accepted client update (.safetensors + .json: num samples, hash, metrics)
  round-<r>/global/update       the aggregated update broadcast for round r, the weights, the model hash
  final/patch                   the model after the last round (lora or merged patch; `federate rebuild`)
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from patchlm.federated import seeds
from patchlm.federated.flower.seed_client import HASH_KEY, hash_hex
from patchlm.federated.flower.seed_task import (
    SeedModel,
    aggregate_update,
    check_update,
    global_record,
    rebuild,
)
from patchlm.federated.flower.strategy import PatchlmStrategy, _natural, _prefix
from patchlm.federated.flower.task import evaluate_model, load_fed_task, load_model, write_json
from patchlm.federated.flower.wire import read_reply, reply_history_rounds
from patchlm.federated.signing import round_digest
from patchlm.train.checkpoint import save_state


class SeedStrategy(PatchlmStrategy):
    """Federated tuning by seeds and scalars (FedKSeed, Ferret) over the same Flower machinery."""

    def __init__(self, cfg, out, log=print):
        super().__init__(cfg, out, log)
        self.hashes: list[str] = []  # model hash after round r (r = 0 .. completed)
        self._type = MessageType.TRAIN

    # ---------------------------------------------------------------- persistence
    def load_history(self, upto: int) -> None:
        recs = [global_record(self.out, r) for r in range(1, upto + 1)]
        self.history = [rec["update"] for rec in recs]
        self.digests = [round_digest(t) for t in self.history]
        self._saved_hashes = [rec["meta"]["model_hash"] for rec in recs]

    def summary(self) -> None:
        c = self.cfg
        what = f"K={c.seeds} seeds ({c.seed_probability})" if c.aggregation == "fedkseed" else \
            f"{c.ferret_bases} bases per tensor"
        self.log(f"patchlm strategy: {c.aggregation} ({what}, scheme {c.scheme}), {c.clients} clients, {c.rounds} "
                 f"rounds, signing {c.sign}, min clients {c.min_clients}, broadcast {c.broadcast}")

    def message_for(self, node: int, full: bool = False) -> Message:
        msg = super().message_for(node, full)
        if self._type == MessageType.TRAIN:
            return msg
        return Message(content=msg.content, message_type=self._type, dst_node_id=node)

    # ---------------------------------------------------------------- a round's replies
    def _read(self, server_round: int, replies, expect_hash: str, final: bool = False):
        """(accepted [(cid, update, metrics, n, up_bytes, signature)], rejected, per-client records, verify s)."""
        accepted, rejected, per_client = [], [], []
        verify_s = 0.0
        n_tensors = len(self.model.names)
        for msg in replies:
            node = msg.metadata.src_node_id
            if not msg.has_error() and "meta" in msg.content:
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
            cid, tensors, metrics = reply.client_id, dict(reply.tensors), reply.metrics
            h = tensors.pop(HASH_KEY, None)
            reason = None
            if h is None or h.dtype != torch.uint8 or h.numel() != 64:
                reason = "no replay hash (uint8[64]) in the update"
            elif final:
                reason = None if not tensors else f"unexpected tensors in a final check: {sorted(tensors)[:3]}"
            else:
                reason = check_update(self.cfg, tensors, n_tensors)
            if reason is None and self.verifier is not None:
                v = self.verifier.check(reply.tensors, reply.claimed(), reply.signature, server_round)
                verify_s += v.seconds
                reason = None if v.ok else v.reason
            if reason is None and not final and reply.num_samples <= 0:
                reason = f"num_samples {reply.num_samples} is not a positive count"
            if reason is None and cid in {a[0] for a in accepted}:
                reason = f"a second update from {cid} in this round"
            if reason is None and hash_hex(h) != expect_hash:
                reason = (f"replay diverged: the client's model hash after replaying rounds 1..{len(self.history)} "
                          f"is {hash_hex(h)[:16]}..., the server's {expect_hash[:16]}...")
            if reason is not None:
                rejected.append({"node": node, "client_id": cid, "reason": reason})
                self.log(f"round {server_round}: dropped {'hash' if final else 'update'} from {cid}: {reason}")
                continue
            accepted.append((cid, tensors, metrics, reply.num_samples, up_bytes, reply.signature))
            self.node_names[node] = cid
            per_client.append({"client_id": cid, "bytes_up": up_bytes, "bytes_down": self._down.get(node, 0),
                               "num_samples": reply.num_samples, "train_loss": metrics.get("train_loss"),
                               "train_seconds": metrics.get("train_seconds"),
                               "replay_seconds": metrics.get("replay_seconds"),
                               "replay_draws": metrics.get("replay_draws"), "seeds_used": metrics.get("seeds_used"),
                               "sign_seconds": metrics.get("sign_seconds", 0.0),
                               "signature_bytes": metrics.get("signature_bytes"),
                               "verify_broadcast_seconds": metrics.get("verify_seconds", 0.0),
                               "model_hash": hash_hex(h)})
        accepted.sort(key=lambda a: _natural(a[0]))  # a fixed order: the aggregate is reproducible from disk
        per_client.sort(key=lambda c: _natural(c["client_id"]))
        return accepted, rejected, per_client, verify_s

    def aggregate_train(self, server_round: int, replies):
        accepted, rejected, per_client, verify_s = self._read(server_round, replies, self.hashes[-1])
        self._round_info = {"rejected": rejected, "clients": per_client, "verify_seconds": verify_s}
        if len(accepted) < self.cfg.min_clients:
            self._round_info["failed"] = f"only {len(accepted)} valid updates, min_clients is {self.cfg.min_clients}"
            return None, None
        total = sum(a[3] for a in accepted)
        weights = [a[3] / total for a in accepted]
        for (cid, t, m, n, _, sig), c in zip(accepted, per_client, strict=True):
            d = self.out / f"round-{server_round}" / cid
            d.mkdir(parents=True, exist_ok=True)
            save_state(d, "update", {"update": t, "meta": {"client_id": cid, "num_samples": n, "metrics": m,
                                                           "signature": sig.hex() if sig else None,
                                                           "model_hash": c["model_hash"]}})
        g = aggregate_update(self.cfg, [a[1] for a in accepted], weights)
        self._round_info["weights"] = {a[0]: w for a, w in zip(accepted, weights, strict=True)}
        return g, None

    # ---------------------------------------------------------------- the loop
    def _broadcast(self, server_round: int, grid: Grid, kind=MessageType.TRAIN) -> list[Message]:
        self._type = kind
        msgs = list(self.configure_train(server_round, None, ConfigRecord(), grid))
        return self._collect(grid, msgs)

    def start(self, grid: Grid, initial_arrays=None, num_rounds=None, timeout: float = 3600, train_config=None,
              evaluate_config=None, evaluate_fn=None):
        """Rounds completed+1 .. cfg.rounds, then the final hash check (a restarted server resumes)."""
        cfg = self.cfg
        done = self.completed_round()
        self.load_history(done)
        self.base = load_model(cfg)
        self.model = SeedModel(self.base, cfg)
        self.task = load_fed_task(cfg)
        self.summary()
        if cfg.aggregation == "fedkseed" and not (self.out / "seeds.json").exists():
            write_json(self.out / "seeds.json", {"seed": cfg.seed, "K": cfg.seeds,
                                                 "candidates": seeds.candidate_seeds(cfg.seed, cfg.seeds)})
        self.hashes = [seeds.state_hash(self.model.theta0)]
        if done:
            state, rinfo = self.model.replay(self.history)
            h = seeds.state_hash(state)
            self.hashes = [self.hashes[0], *self._saved_hashes[:-1], h]
            same = h == self._saved_hashes[-1]
            self.log(f"resuming after round {done}: replayed model {'equals' if same else 'DIFFERS FROM'} the "
                     "saved hash")
            self._log({"event": "resume", "completed_round": done, "replay_matches_saved_hash": same, **rinfo,
                       "time": time.time()})
            if not same:
                raise RuntimeError(f"the replayed model of round {done} does not match its saved hash: the run "
                                   "directory or this machine's replay differs")
        elif cfg.eval_limit:
            m = evaluate_model(self.base, self.task, cfg)
            self._log({"event": "round", "round": 0, "model_hash": self.hashes[0], **_prefix(m, "eval_")})
        self._wait_for_nodes(grid, cfg.min_clients, min(cfg.round_timeout, 600))
        for r in range(done + 1, cfg.rounds + 1):
            t_round = time.time()
            self._gone = []
            replies = self._broadcast(r, grid)
            t_agg = time.time()
            agg, _ = self.aggregate_train(r, replies)
            info = self._round_info
            info.update({"disconnected_nodes": self._gone, "missing": self._missing,
                         "broadcast_sign_seconds": self._sign_seconds, "resent_full_history": self._resent})
            if agg is None:
                self._log({"event": "round_failed", "round": r, **info, "time": time.time()})
                raise RuntimeError(f"round {r} failed: {info.get('failed')}; the run can resume with --resume")
            self.history.append(agg)
            self.digests.append(round_digest(agg))
            state, rinfo = self.model.replay(self.history)
            h = seeds.state_hash(state)
            agg_s = time.time() - t_agg
            t_eval = time.time()
            m = evaluate_model(self.base, self.task, cfg)
            eval_s = time.time() - t_eval
            round_s = time.time() - t_round
            d = self.out / f"round-{r}" / "global"
            d.mkdir(parents=True, exist_ok=True)
            save_state(d, "update", {"update": agg, "meta": {
                "round": r, "model_hash": h, "weights": info["weights"], "aggregation": cfg.aggregation,
                "clients": [c["client_id"] for c in info["clients"]], **_prefix(m, "eval_")}})
            self.hashes.append(h)
            write_json(self.out / "state.json", {"completed_round": r, "run_id": cfg.run_id})
            clients = info["clients"]
            rec = {"event": "round", "round": r, "round_time_s": round_s - eval_s, "eval_seconds": eval_s,
                   "bytes_up": sum(c["bytes_up"] for c in clients), "bytes_down": sum(self._down.values()),
                   "bytes_down_per_client": sum(self._down.values()) / max(1, len(self._down)),
                   "sign_seconds_clients": sum(c["sign_seconds"] or 0 for c in clients),
                   "verify_seconds": info["verify_seconds"],
                   "verify_broadcast_seconds": sum(c["verify_broadcast_seconds"] or 0 for c in clients),
                   "max_client_train_seconds": max((c["train_seconds"] or 0) for c in clients),
                   "train_seconds_clients": sum(c["train_seconds"] or 0 for c in clients),
                   "replay_seconds_clients": sum(c["replay_seconds"] or 0 for c in clients),
                   "server_replay_seconds": rinfo["replay_seconds"], "server_aggregate_seconds": agg_s,
                   "replay_draws": rinfo["replay_draws"], "replay_dims": rinfo["replay_dims"],
                   "model_hash": h, "aggregation_error": 0.0,
                   **{k: v for k, v in info.items() if k != "verify_seconds"}, **_prefix(m, "eval_"),
                   "time": time.time()}
            self._log(rec)
            acc = f", accuracy {m['accuracy']:.3f}" if "accuracy" in m else ""
            self.log(f"round {r}: {len(clients)} updates, {len(info['rejected'])} rejected, replay "
                     f"{rinfo['replay_seconds']:.2f} s{acc}")
            if os.environ.get("PATCHLM_FED_CRASH_AFTER_ROUND") == str(r):  # test hook: a server crash
                raise RuntimeError(f"injected server crash after round {r}")
        self._final_check(grid)
        rebuild(self.out, cfg.rounds, self.out / "final" / "patch", force=True)
        write_json(self.out / "state.json", {"completed_round": cfg.rounds, "run_id": cfg.run_id, "finished": True})

    def _final_check(self, grid: Grid) -> None:
        """Every node replays the final model and returns its hash; log whether all equal the server's."""
        cfg = self.cfg
        self._gone = []
        replies = self._broadcast(cfg.rounds + 1, grid, MessageType.EVALUATE)
        _, rejected, per_client, _ = self._read(cfg.rounds + 1, replies, self.hashes[-1], final=True)
        ok = {c["client_id"] for c in per_client}
        diverged = [x for x in rejected if "replay diverged" in x["reason"]]
        rec = {"event": "final_check", "round": cfg.rounds, "server_hash": self.hashes[-1],
               "clients": per_client, "rejected": rejected, "clients_matching": sorted(ok, key=_natural),
               "hashes_match": len(ok) == cfg.clients and not rejected,
               "bytes_down": sum(self._down.values()), "time": time.time()}
        self._log(rec)
        self.log(f"final check: {len(ok)} of {cfg.clients} clients hold the server's model"
                 + (f"; {len(diverged)} diverged" if diverged else ""))

    def _save_final(self) -> None:  # the final patch is written by rebuild() in start()
        return None

