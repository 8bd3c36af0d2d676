"""FedKSeed and Ferret (seeds and scalars on the wire) on smollm2-135m over a real Flower deployment (1 SuperLink +
8 SuperNodes on loopback, rotten_tomatoes, Dirichlet 0.5, ML-DSA-65 signing), full parameters and LoRA, next to
the FLoRA and FedIT rows of bench/federated.py (docs/benchmarks/federated.json) at the same number of rounds.

    flock /tmp/patchlm-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python bench/federated_seeds.py [--quick]

Columns: accuracy per round, bytes up and down per client per round (Flower payload sizes as the strategy logs
them), round time split into training / replay / communication and the rest, whether every client's final model
hash equals the server's, and the server's replay time against K x d (the draws it made) at this machine's
generator throughput measured in the same run. Writes docs/benchmarks/federated-seeds.md and .json; every
finished run is cached under bench/.cache/federated-seeds/ (rows resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, DOCS, RowCache, md_table, write_results
from federated import settings as lora_settings


def settings(quick: bool) -> dict:
    """bench/federated.py's task, partition, clients and rounds; the tiny model for --quick."""
    base = lora_settings(quick)
    base = {k: v for k, v in base.items() if k not in ("lr", "local_steps")}
    if quick:
        return {**base, "model": "tiny-random-llama", "clients": 4, "rounds": 2, "eval_limit": 20, "max_train": 400,
                "bf16": False}
    return base


def runs(quick: bool) -> list[dict]:
    """One spec per row: the method's own options (lr, local steps, K / bases) chosen before the study."""
    rows = [
        {"name": "fedkseed-lora", "aggregation": "fedkseed", "scheme": "lora", "seeds": 1024, "lr": 5e-4,
         "local_steps": 16, "zo_eps": 1e-3},
        {"name": "fedkseed-pro-lora", "aggregation": "fedkseed", "scheme": "lora", "seeds": 1024, "lr": 5e-4,
         "local_steps": 16, "zo_eps": 1e-3, "seed_probability": "pro"},
        {"name": "fedkseed-full", "aggregation": "fedkseed", "scheme": "full", "seeds": 64, "lr": 2e-6,
         "local_steps": 16, "zo_eps": 1e-3},
        {"name": "ferret-lora", "aggregation": "ferret", "scheme": "lora", "ferret_bases": 64, "lr": 2e-3,
         "local_steps": 10},
        {"name": "ferret-full", "aggregation": "ferret", "scheme": "full", "ferret_bases": 16, "lr": 1e-5,
         "local_steps": 10},
    ]
    if quick:
        rows = [{**r, "seeds": min(r.get("seeds", 0), 128) or None, "local_steps": 3} for r in rows
                if r["name"] in ("fedkseed-lora", "fedkseed-full", "ferret-lora")]
        rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    return rows


def one_run(spec: dict, base: dict, workdir: Path, throughput: float) -> dict:
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate, read_log

    opts = {k: v for k, v in spec.items() if k != "name"}
    cfg = FedConfig(**{**base, **opts, "sign": "mldsa"})
    out = workdir / spec["name"]
    if out.exists():
        shutil.rmtree(out)
    s = federate(cfg, out, log=lambda m: print(f"  {m}", flush=True), timeout=4 * 3600)
    log = read_log(out)
    recs = [r for r in log if r.get("event") == "round"]
    init = next((r for r in recs if r["round"] == 0), {})
    rounds = [r for r in recs if r["round"] > 0]
    fin = next(r for r in log if r.get("event") == "final_check")
    per_client = [c["bytes_up"] + c["bytes_down"] for r in rounds for c in r["clients"]]
    up = [c["bytes_up"] for r in rounds for c in r["clients"]]
    down = [c["bytes_down"] for r in rounds for c in r["clients"]]
    n = len(rounds)
    train = sum(r["train_seconds_clients"] for r in rounds) / n
    replay_c = sum(r["replay_seconds_clients"] for r in rounds) / n
    replay_s = sum(r["server_replay_seconds"] for r in rounds) / n
    rt = sum(r["round_time_s"] for r in rounds) / n
    theory = [r["replay_draws"] / throughput for r in rounds]
    return {**spec, "status": "ok", "clients": cfg.clients, "rounds": cfg.rounds,
            "initial_accuracy": init.get("eval_accuracy"),
            "accuracy_per_round": [r.get("eval_accuracy") for r in rounds],
            "final_accuracy": rounds[-1].get("eval_accuracy"), "final_macro_f1": rounds[-1].get("eval_macro_f1"),
            "bytes_per_client_round": sum(per_client) / len(per_client),
            "bytes_up_per_client_round": sum(up) / len(up), "bytes_down_per_client_round": sum(down) / len(down),
            "round_time_s": rt, "train_seconds_per_round": train,
            "replay_seconds_per_round": replay_c + replay_s,
            "server_replay_seconds": [r["server_replay_seconds"] for r in rounds],
            "replay_draws": [r["replay_draws"] for r in rounds], "replay_dims": rounds[-1]["replay_dims"],
            "replay_theory_seconds": theory,
            "replay_vs_theory": max(a / b for a, b in zip((r["server_replay_seconds"] for r in rounds), theory,
                                                           strict=True) if b > 0) if any(theory) else None,
            "other_seconds_per_round": rt - train - replay_c - replay_s,
            "hashes_match": bool(fin["hashes_match"]), "final_hash_clients": len(fin["clients_matching"]),
            "rejected": sum(len(r["rejected"]) for r in rounds),
            "leftover_processes": len(s["leftover_processes"])}


def lora_rows(base: dict) -> list[dict]:
    """FLoRA and FedIT (homogeneous rank 8) from bench/federated.py's study, per client per round."""
    f = DOCS / "federated.json"
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    same = {k: d.get("settings", {}).get(k) == base.get(k) for k in ("model", "task", "clients", "rounds")}
    out = []
    for r in d["rows"]:
        if r["name"] not in ("flora-homogeneous", "fedit-homogeneous") or r.get("status") != "ok":
            continue
        c = d["settings"]["clients"]
        out.append({"name": r["name"] + " (federated.json)", "aggregation": r["aggregation"], "scheme": "lora r8",
                    "status": "reference" if all(same.values()) else "reference (other settings)",
                    "rounds": d["settings"]["rounds"], "initial_accuracy": r["initial_accuracy"],
                    "accuracy_per_round": r["accuracy_per_round"], "final_accuracy": r["final_accuracy"],
                    "bytes_per_client_round": r["bytes_per_round"] / c,
                    "bytes_up_per_client_round": r["bytes_up_per_round"] / c,
                    "bytes_down_per_client_round": r["bytes_down_per_round"] / c,
                    "round_time_s": r["round_time_s"], "hashes_match": None,
                    "note": "full broadcast (every previous round each round), LoRA tensors on the wire"})
    return out


def page(rows: list[dict], base: dict, throughput: float, quick: bool, pending: list[str]) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    table = md_table([{**r, "K / bases": r.get("seeds") or r.get("ferret_bases"),
                       "acc per round": " / ".join(f(a) for a in r.get("accuracy_per_round") or []) or "-",
                       "KB/client/round": None if r.get("bytes_per_client_round") is None
                       else r["bytes_per_client_round"] / 1e3,
                       "up KB": None if r.get("bytes_up_per_client_round") is None
                       else r["bytes_up_per_client_round"] / 1e3,
                       "down KB": None if r.get("bytes_down_per_client_round") is None
                       else r["bytes_down_per_client_round"] / 1e3}
                      for r in rows],
                     ["name", "status", "scheme", "K / bases", "lr", "local_steps", "initial_accuracy",
                      "acc per round", "final_accuracy", "KB/client/round", "up KB", "down KB", "round_time_s",
                      "train_seconds_per_round", "replay_seconds_per_round", "other_seconds_per_round",
                      "replay_vs_theory", "hashes_match"])
    ok = [r for r in rows if r.get("status") == "ok"]
    ref = {r["aggregation"]: r for r in rows if str(r.get("status", "")).startswith("reference")}
    goals = []
    fk = [r for r in ok if r["aggregation"] == "fedkseed"]
    if fk:
        worst = max(r["bytes_per_client_round"] for r in fk)
        fl = ref.get("flora")
        ratio = (f", {fl['bytes_per_client_round'] / worst:,.0f}x less than FLoRA's "
                 f"{fl['bytes_per_client_round'] / 1e6:.1f} MB") if fl else ""
        goals.append(f"- FedKSeed <= 18 KB up + down per client per round on the wire: "
                     f"**{'met' if worst <= 18_000 else 'not met'}** (largest {worst / 1e3:.1f} KB{ratio}; "
                     "signatures, the FedConfig JSON and the digest list included).")
    if ok:
        allm = all(r["hashes_match"] for r in ok)
        goals.append(f"- Every client's final model bit-identical to the server's (same hash) in every row: "
                     f"**{'met' if allm else 'not met'}** ({sum(r['hashes_match'] for r in ok)} of {len(ok)} rows).")
        above = [r for r in ok if r["final_accuracy"] is not None and r["initial_accuracy"] is not None
                 and r["final_accuracy"] > r["initial_accuracy"]]
        fl = ref.get("flora")
        goals.append(f"- Accuracy above zero-shot after the rounds: **{len(above)} of {len(ok)} rows** ("
                     + "; ".join(f"{r['name']} {f(r['initial_accuracy'])} -> {f(r['final_accuracy'])}" for r in ok)
                     + (f"; FLoRA {f(fl['final_accuracy'])}, FedIT {f((ref.get('fedit') or {}).get('final_accuracy'))}"
                        if fl else "") + ").")
        rv = [r["replay_vs_theory"] for r in ok if r.get("replay_vs_theory")]
        if rv:
            goals.append(f"- Server replay time within 25% of its draws at this machine's generator throughput "
                         f"({throughput / 1e6:.0f} M draws/s measured in this run): "
                         f"**{'met' if max(rv) <= 1.25 else 'not met'}** (replay / theory "
                         f"{min(rv):.2f}-{max(rv):.2f}).")
    if pending:
        goals.append(f"- Rows not run yet (cached rows resume): {', '.join(pending)}.")
    setup = (f"Setup: {base['model']}, task `{base['task']}` (first {base['max_train']} training examples, Dirichlet "
             f"alpha {base['dirichlet_alpha']} into {base['clients']} clients), {base['rounds']} rounds, batch "
             f"{base['batch_size']}, max length {base['max_length']}, bf16 autocast {base['bf16']}, targets "
             f"`{base['targets']}`, ML-DSA-65 signatures both ways, the default delta broadcast. FedKSeed: "
             "zeroth-order local steps (two-sided, Gaussian directions, eps 1e-3), K candidate seeds, replay from "
             "theta_0 with G cumulative since round 0. Ferret: AdamW local steps (as the LoRA rows), the update of "
             "each tensor projected on the round's shared Gaussian bases, unbiased reconstruction (1/n) sum_j c_j "
             "z_j. Scheme lora: one LoRA of rank 8 (alpha 16) shared by all clients; scheme full: the q and v "
             "projection weights themselves (d = 13.3M). Round time: broadcast to aggregated update, server "
             "evaluation excluded; training = the clients' local steps (one client at a time: 8 clients share 2 "
             "cores), replay = the clients' replays plus the server's, other = the rest (signing, loading the "
             "model in each ClientApp, Flower messaging). Bytes: Flower payloads (arrays + config records).")
    notes = ("Reading the numbers: the LoRA rows come from bench/federated.py's run (`--broadcast full`: their "
             "downlink carries every previous round; their delta broadcast, federated-broadcast.md, is smaller but "
             "still megabytes). The replay's theory is the draws the server made (only seeds with a non-zero "
             "cumulative scalar, at most K x d) divided by the measured fp32 generator throughput; the replay also "
             "accumulates in float64, one term at a time (each tensor's draw widened in its own pass, one generator "
             "reused; tensors of a few thousand entries, so a draw's per-call cost counts, which the theory, drawn "
             "in chunks of 4M, does not have). Ferret's unbiased reconstruction has variance about "
             "(d / n) ||delta||^2 per tensor: with a few dozen bases on tensors of thousands of entries the "
             "reconstructed update is mostly noise, which is what its accuracy shows; the official code's biased "
             "form shrinks the update by 3 and relies on a server learning rate of about 10. ZO needs many more "
             "steps than first order: at equal rounds and comparable compute per round FedKSeed moves the model "
             "much less than FLoRA. One seed, 200 test examples (standard error about 3.5 points).")
    if quick:
        notes += "\n\n**This is a --quick smoke run on the tiny random model: not the study.**"
    return "\n\n".join(["## Results", table, "## Goals", "\n".join(goals), "## Setup", setup, "## Notes", notes])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run on the tiny model")
    ap.add_argument("--only", default="", help="comma-separated run names (the others are reported as pending)")
    ap.add_argument("--rounds", type=int, help="fewer rounds than bench/federated.py's (rows cached apart)")
    ap.add_argument("--clients", type=int, help="fewer clients than bench/federated.py's (rows cached apart)")
    args = ap.parse_args()
    import torch

    from patchlm.federated.seeds import throughput as gen_throughput

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = settings(args.quick)
    base.update({k: v for k, v in (("rounds", args.rounds), ("clients", args.clients)) if v})
    tag = ("quick" if args.quick else "full") + "-" + \
        hashlib.sha1(json.dumps([base, runs(args.quick)], sort_keys=True).encode()).hexdigest()[:8]
    cache = RowCache("federated-seeds", tag, committed=True)
    workdir = CACHE / "federated-seeds" / tag / "runs"
    tp = gen_throughput()
    print(f"generator throughput {tp / 1e6:.0f} M draws/s", flush=True)
    rows, pending = [], []
    for spec in runs(args.quick):
        if args.only and spec["name"] not in args.only.split(","):
            hit = cache.get(spec["name"])
            if hit is not None:
                rows.append(hit)
            else:
                pending.append(spec["name"])
            continue
        print(f"== {spec['name']}", flush=True)
        rows.append(cache.run(spec["name"], lambda s=spec: one_run(s, base, workdir, tp)))
        print(json.dumps({k: rows[-1].get(k) for k in ("name", "final_accuracy", "bytes_per_client_round",
                                                       "round_time_s", "replay_vs_theory", "hashes_match")}),
              flush=True)
    rows += [] if args.quick else lora_rows(base)
    write_results("federated-seeds", rows, page(rows, base, tp, args.quick, pending),
                  extra={"settings": base, "generator_throughput": tp}, suffix="-quick" if args.quick else "")


if __name__ == "__main__":
    main()
