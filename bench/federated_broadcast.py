"""Downlink of the federated broadcast: `--broadcast full` (every previous global update, every round) against
`--broadcast delta` (the signed digests of all rounds plus only the rounds a client has not cached), FLoRA on
smollm2-135m over a real Flower deployment of 8 SuperNodes, homogeneous (8) and heterogeneous
(16,8,8,4,4,4,2,2) ranks.

The two modes must train the same model: the script also compares the final stacked patches of the two runs
tensor by tensor (the clients' training is deterministic given the seed, so any difference would be a bug in
how the delta broadcast rebuilds the history).

    flock /tmp/patchlm-heavy.lock env OMP_NUM_THREADS=2 .venv/bin/python bench/federated_broadcast.py [--quick]

Writes docs/benchmarks/federated-broadcast.md and .json; finished runs are cached under bench/.cache/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RowCache, md_table, write_results

HOMO = [8] * 8
HETERO = [16, 8, 8, 4, 4, 4, 2, 2]


def settings(quick: bool) -> dict:
    base = {"model": "smollm2-135m", "task": "rotten_tomatoes", "clients": 8, "batch_size": 8, "max_length": 128,
            "bf16": True, "targets": "qv", "dirichlet_alpha": 0.5, "partition": "dirichlet", "lr": 2e-3,
            "aggregation": "flora", "sign": "mldsa", "max_train": 4000}
    # the bytes do not depend on how long clients train: a couple of local steps keep the study short
    return {**base, "rounds": 2 if quick else 3, "local_steps": 1, "eval_limit": 0}


def one_run(name: str, ranks: list[int], broadcast: str, base: dict, workdir: Path) -> dict:
    from patchlm.federated.config import FedConfig
    from patchlm.federated.flower.run import federate, read_log

    out = workdir / name
    if out.exists():
        shutil.rmtree(out)
    cfg = FedConfig(**base, ranks=ranks, broadcast=broadcast)
    s = federate(cfg, out, log=lambda m: print(f"  {m}", flush=True), timeout=3 * 3600)
    rounds = [r for r in read_log(out) if r.get("event") == "round" and r["round"] > 0]
    return {"name": name, "broadcast": broadcast, "ranks": ranks,
            "down_mb_per_round": [r["bytes_down"] / 1e6 for r in rounds],
            "up_mb_per_round": [r["bytes_up"] / 1e6 for r in rounds],
            "down_mb_total": sum(r["bytes_down"] for r in rounds) / 1e6,
            "verify_broadcast_s_per_round": [r.get("verify_broadcast_seconds", 0.0) for r in rounds],
            "round_time_s": [r["round_time_s"] for r in rounds],
            "resent_full_history": sum(len(r.get("resent_full_history", [])) for r in rounds),
            "leftover_processes": len(s["leftover_processes"])}


def max_diff(a: Path, b: Path) -> float:
    from patchlm.patch import Patch

    pa, pb = Patch.load(a), Patch.load(b)
    assert set(pa.tensors) == set(pb.tensors)
    return max(float((pa.tensors[k].float() - pb.tensors[k].float()).abs().max()) for k in pa.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 local step")
    args = ap.parse_args()
    base = settings(args.quick)
    tag = "quick" if args.quick else "full"
    cache = RowCache("federated-broadcast", tag, committed=True)
    workdir = CACHE / "federated-broadcast" / tag / "runs"
    rows = []
    for setting, ranks in (("homogeneous", HOMO), ("heterogeneous", HETERO)):
        pair = {}
        for broadcast in ("full", "delta"):
            name = f"flora-{setting}-{broadcast}"
            print(f"== {name}", flush=True)
            pair[broadcast] = cache.run(name, lambda n=name, r=ranks, b=broadcast: one_run(n, r, b, base, workdir))
        same = None
        if all((workdir / f"flora-{setting}-{b}" / "final" / "patch").exists() for b in pair):
            same = max_diff(workdir / f"flora-{setting}-full" / "final" / "patch",
                            workdir / f"flora-{setting}-delta" / "final" / "patch")
        for row in pair.values():
            rows.append({**row, "setting": setting, "final_patch_max_abs_diff_full_vs_delta": same,
                         "down_saving": 1 - row["down_mb_total"] / pair["full"]["down_mb_total"]})
    fmt = {"down_mb_per_round": lambda v: " / ".join(f"{x:.1f}" for x in v),
           "up_mb_per_round": lambda v: " / ".join(f"{x:.1f}" for x in v),
           "verify_broadcast_s_per_round": lambda v: " / ".join(f"{x:.2f}" for x in v),
           "down_mb_total": lambda v: f"{v:.1f}", "down_saving": lambda v: f"{100 * v:.1f}%",
           "final_patch_max_abs_diff_full_vs_delta": lambda v: f"{v:.1e}"}
    table = md_table(rows, ["name", "down_mb_per_round", "down_mb_total", "down_saving", "up_mb_per_round",
                            "verify_broadcast_s_per_round", "final_patch_max_abs_diff_full_vs_delta"], fmt)
    r = base["rounds"]
    md = f"""
## Downlink per round: full history vs delta broadcast

FLoRA on {base['model']} (`{base['targets']}` targets, {base['clients']} SuperNodes on loopback, {r} rounds x
{base['local_steps']} local steps, ML-DSA-65 signing). MB are the payloads of the Flower messages (tensors + config)
summed over the {base['clients']} clients. `verify_broadcast_s` is the clients' time (summed) to check the server's \
signature
and hash the received and cached rounds against the signed digests. The last column compares the final stacked
patch of the full and the delta runs (0 = the same model).

{table}

With the full broadcast the downlink of round r carries r - 1 global updates, so it grows linearly with the
rounds (quadratically in total); with the delta broadcast every round after the first carries one global
update per client (round 1 carries none: there is no history yet). A client that lost its cache is resent the
whole history within the round (tested in `tests/test_federated_flower.py`).
"""
    if args.quick:
        md += "\n**Quick smoke run.**\n"
    write_results("federated-broadcast", rows, md, extra={"settings": base}, suffix="-quick" if args.quick else "")
    print(md)


if __name__ == "__main__":
    main()
