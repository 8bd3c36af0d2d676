"""`patchlm federate` behind the CLI: prepare the run directory (config, keys), start a local Flower deployment,
run the app, shut everything down, and summarise the run log."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from patchlm.errors import ConfigError, OutputExistsError, PatchlmError
from patchlm.federated.config import RUN_TIMEOUT, FedConfig
from patchlm.federated.flower.task import write_json


def read_log(out: str | Path) -> list[dict]:
    f = Path(out) / "log.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def make_keys(out: Path, scheme: str, clients: int) -> None:
    """Server and client key pairs plus the public-key registry (a local stand-in for out-of-band distribution)."""
    from patchlm.federated.signing import KeyPair, KeyRegistry

    reg = KeyRegistry()
    keys = out / "keys"
    server = KeyPair.generate(scheme)
    server.save(keys / "server.key")
    reg.add("server", scheme, server.public_key)
    for k in range(clients):
        kp = KeyPair.generate(scheme)
        kp.save(keys / f"client-{k}.key")
        reg.add(f"client-{k}", scheme, kp.public_key)
    reg.save(keys / "registry.json")


def _preflight(cfg: FedConfig) -> None:
    """Fail on bad input before anything is written: model name, task, partition."""
    from patchlm.errors import UnknownNameError, did_you_mean
    from patchlm.federated.flower.task import load_fed_task, partition_indices
    from patchlm.models.base import BUILTIN_MODELS

    if cfg.model not in BUILTIN_MODELS and not Path(cfg.model).exists() and "/" not in cfg.model:
        raise UnknownNameError(f"unknown model {cfg.model!r}; {did_you_mean(cfg.model, BUILTIN_MODELS)}")
    task = load_fed_task(cfg)
    partition_indices(task, cfg.clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed, max_train=cfg.max_train)


def federate(cfg: FedConfig, out: str | Path, *, resume: bool = False, force: bool = False,
             sequential: bool = True, timeout: float = RUN_TIMEOUT, faults: dict[int, str] | None = None,
             log=None) -> dict:
    """Run a federated job over a local Flower deployment; return the summary (rounds, final metrics)."""
    log = log or (lambda m: None)
    out = Path(out).resolve()
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: pick one")
    if resume:
        f = out / "federate.json"
        if not f.exists():
            raise ConfigError(f"nothing to resume in {out}: no federate.json")
        saved = json.loads(f.read_text())
        mine = {**cfg.to_dict(), "out": saved["out"], "run_id": saved["run_id"]}
        differ = sorted(k for k in saved if k not in ("rounds",) and saved[k] != mine.get(k))
        if differ:
            raise ConfigError(f"--resume with other options than the run in {out} ({', '.join(differ)}); "
                              "give the same options (only rounds may grow)", field=differ[0])
        cfg = FedConfig.from_dict(mine)
    else:
        if out.exists() and any(out.iterdir()) and not force:
            raise OutputExistsError(f"output {out} already exists; pass --force to start over or --resume to continue")
        _preflight(cfg)
        if out.exists():
            shutil.rmtree(out)
        cfg.run_id = cfg.run_id or uuid.uuid4().hex
    cfg.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "federate.json", cfg.to_dict())
    if cfg.sign != "none" and not (out / "keys" / "registry.json").exists():
        make_keys(out, cfg.sign, cfg.clients)
    (out / "server-error.txt").unlink(missing_ok=True)
    st = out / "state.json"
    if st.exists():  # a finished run resumed with more rounds is not finished any more
        prev = json.loads(st.read_text())
        write_json(st, {"completed_round": prev["completed_round"], "run_id": cfg.run_id})
    from patchlm.federated.flower.deploy import LocalDeployment, write_app

    app = write_app(out / ".flower" / "app")
    nodes = []
    for k in range(cfg.clients):
        nc = {"partition-id": k, "num-partitions": cfg.clients, "client-id": f"client-{k}",
              "history-cache": str(out / ".flower" / "cache")}
        if cfg.sign != "none":
            nc.update({"key-file": str(out / "keys" / f"client-{k}.key"),
                       "registry": str(out / "keys" / "registry.json")})
        if sequential:
            nc["lock"] = str(out / ".flower" / "clients.lock")
        if faults and k in faults:
            nc["fault"] = faults[k]
        nodes.append(nc)

    def finished() -> bool:
        st = out / "state.json"
        if (out / "server-error.txt").exists():
            return True
        return st.exists() and json.loads(st.read_text()).get("finished", False)

    dep = LocalDeployment(out / ".flower", nodes, log=log)
    try:
        dep.start()
        dep.run(app, {"config": str(out / "federate.json")}, timeout=timeout, done=finished)
    finally:
        dep.stop()
    leftovers = dep.alive()
    err = out / "server-error.txt"
    if err.exists():
        raise PatchlmError(f"federated run failed: {err.read_text().strip()} (logs in {out / '.flower' / 'logs'}; "
                           "completed rounds are kept: rerun with --resume)")
    st = out / "state.json"
    if not st.exists() or not json.loads(st.read_text()).get("finished"):
        raise PatchlmError(f"federated run stopped before the end; see {out / '.flower' / 'logs'} "
                           "(rerun with --resume)")
    return summarize(out) | {"leftover_processes": leftovers}


def summarize(out: str | Path) -> dict:
    allrecs = [r for r in read_log(out) if r.get("event") == "round"]
    recs = [r for r in allrecs if r["round"] > 0]
    init = next((r for r in allrecs if r["round"] == 0), {})
    cfg = json.loads((Path(out) / "federate.json").read_text())
    rounds = [{k: r.get(k) for k in ("round", "eval_accuracy", "eval_perplexity", "aggregation_error", "bytes_up",
                                     "bytes_down", "round_time_s", "sign_seconds_clients", "verify_seconds")}
              | {"num_updates": len(r.get("clients", [])), "rejected": r.get("rejected", [])}
              for r in recs]
    last = rounds[-1] if rounds else {}
    return {"out": str(out), "run_id": cfg["run_id"], "aggregation": cfg["aggregation"], "ranks": cfg["ranks"],
            "initial_accuracy": init.get("eval_accuracy"), "rounds": rounds,
            "final_accuracy": last.get("eval_accuracy"), "final_perplexity": last.get("eval_perplexity"),
            "final_patch": str(Path(out) / "final" / "patch")}
