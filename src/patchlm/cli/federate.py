"""Commands: federate (federated LoRA over a local Flower deployment), federate-keygen, federate-app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, print_table, status


def federate(
    model: Annotated[str, typer.Option("--model", "-m", help="base model: built-in name or checkpoint dir")] = "tiny-random-llama",
    task: Annotated[str, typer.Option("--task", "-t", help="built-in task (health_tweets for natural clients) or data file")] = "sms_spam",
    clients: Annotated[int, typer.Option(help="number of clients (SuperNodes)")] = 2,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 3,
    aggregation: Annotated[str, typer.Option(help="flora | fedit | zeropad | ffa")] = "flora",
    ranks: Annotated[str, typer.Option(help="LoRA rank per client, e.g. 16,8,8,4 (one value = every client)")] = "8",
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha for every client [2 x its rank]")] = None,
    targets: Annotated[str, typer.Option(help="LoRA target modules: preset (qv, attn, mlp, all-linear) or names")] = "qv",
    local_steps: Annotated[int, typer.Option(help="optimizer steps per client per round")] = 10,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 8,
    lr: Annotated[float, typer.Option(help="client learning rate")] = 5e-4,
    max_length: Annotated[int, typer.Option(help="max tokens per example")] = 128,
    partition: Annotated[str, typer.Option(help="dirichlet | iid | natural (example['client'], e.g. health_tweets outlets)")] = "dirichlet",
    dirichlet_alpha: Annotated[float, typer.Option("--alpha-dirichlet", "--dirichlet-alpha", help="Dirichlet concentration over labels")] = 0.5,
    max_train: Annotated[int | None, typer.Option(help="use only the first N training examples")] = None,
    seed: Annotated[int, typer.Option(help="seed of partitions, inits and data order")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast (about 2x faster on AVX-512 BF16 CPUs)")] = False,
    sign: Annotated[str, typer.Option(help="signature on every update and broadcast: mldsa (ML-DSA-65) | slhdsa | none")] = "mldsa",
    protocol: Annotated[str, typer.Option(help="merge: FLoRA's protocol, each round's global update is merged into the base and clients start a fresh LoRA | continue: FedIT's, clients keep training the global LoRA (fedit, zeropad, ffa)")] = "merge",
    broadcast: Annotated[str, typer.Option(help="delta: send each client only the global rounds it has not cached yet | full: the whole history every round")] = "delta",
    dp: Annotated[bool, typer.Option("--dp", help="client-side DP-SGD with Opacus")] = False,
    dp_noise: Annotated[float, typer.Option(help="DP noise multiplier")] = 1.0,
    dp_clip: Annotated[float, typer.Option(help="DP per-example clipping norm")] = 1.0,
    dp_delta: Annotated[float | None, typer.Option(help="DP delta [1/n^1.1 per client]")] = None,
    dp_flat: Annotated[bool, typer.Option("--dp-flat", help="DP-Flat on top of --dp (see docs)")] = False,
    min_clients: Annotated[int | None, typer.Option(help="valid replies that complete a round [all clients]")] = None,
    round_timeout: Annotated[float, typer.Option(help="seconds a round waits for replies")] = 1800.0,
    straggler_timeout: Annotated[float | None, typer.Option(help="once --min-clients replied, wait at most this many seconds for the rest")] = None,
    eval_limit: Annotated[int, typer.Option(help="test examples the server evaluates each round (0 = none)")] = 200,
    parallel_clients: Annotated[bool, typer.Option("--parallel-clients", help="let local clients train at the same time (default: one at a time)")] = False,
    timeout: Annotated[float, typer.Option(help="overall time limit in seconds")] = 7200.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in OUT after its last completed round")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT and start over")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the run summary as JSON")] = False,
) -> None:
    """Federated LoRA fine-tuning over a real Flower deployment on this machine (a SuperLink and one SuperNode per
    client on loopback), with FLoRA / FedIT / zero-padding / FFA-LoRA aggregation, signed updates and optional DP.

    Writes OUT/round-R/client-K/patch (K = client index), OUT/round-R/global/patch, OUT/final/patch and OUT/log.jsonl.

    Example: `patchlm federate --model tiny-random-llama --task sms_spam --clients 2 --rounds 2 --aggregation flora --ranks 4,2 --local-steps 3 --out runs/fed`
    """
    from patchlm.errors import ConfigError
    from patchlm.federated.flower.run import federate as run
    from patchlm.federated.flower.task import FedConfig, parse_ranks

    if out is None:
        raise ConfigError("federate needs --out DIR (the run directory)")
    cfg = FedConfig(model=model, task=task, clients=clients, rounds=rounds, aggregation=aggregation,
                    ranks=parse_ranks(ranks), alpha=alpha, targets=targets, local_steps=local_steps,
                    batch_size=batch_size, lr=lr, max_length=max_length, partition=partition,
                    dirichlet_alpha=dirichlet_alpha, max_train=max_train, seed=seed, bf16=bf16, sign=sign, broadcast=broadcast, protocol=protocol, dp=dp,
                    dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta, dp_flat=dp_flat, min_clients=min_clients,
                    round_timeout=round_timeout, straggler_timeout=straggler_timeout, eval_limit=eval_limit)
    summary = run(cfg, out, resume=resume, force=force, sequential=not parallel_clients, timeout=timeout,
                  log=None if json_out else status)
    if json_out:
        print_json(summary)
        return
    rows = [{**r, "rejected": len(r["rejected"])} for r in summary["rounds"]]
    print_table(rows, ["round", "num_updates", "rejected", "aggregation_error", "eval_accuracy", "eval_perplexity",
                       "bytes_up", "bytes_down", "round_time_s"], title=f"federate {summary['aggregation']} -> {out}")
    status(f"final patch: {summary['final_patch']}")


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="private key file to write")],
    scheme: Annotated[str, typer.Option(help="mldsa (ML-DSA-65) | slhdsa (SLH-DSA-SHA2-128s)")] = "mldsa",
    registry: Annotated[Path | None, typer.Option(help="add the public key to this registry JSON")] = None,
    identity: Annotated[str, typer.Option(help="identity in the registry (client-K or server)")] = "client-0",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing key file")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the public key as JSON")] = False,
) -> None:
    """Make a post-quantum key pair for a federated client or server (keep the private key on that machine;
    share the public key through the registry).

    Example: `patchlm federate-keygen --out keys/client-0.key --registry keys/registry.json --identity client-0`
    """
    import base64

    from patchlm.federated.signing import KeyPair, KeyRegistry
    from patchlm.paths import check_output

    check_output(out, force)
    kp = KeyPair.generate(scheme)
    kp.save(out)
    if registry is not None:
        reg = KeyRegistry.load(registry) if registry.exists() else KeyRegistry()
        reg.add(identity, scheme, kp.public_key)
        reg.save(registry)
    info = {"key": str(out), "scheme": scheme, "identity": identity,
            "public_key": base64.b64encode(kp.public_key).decode()}
    if json_out:
        print_json(info)
    else:
        status(f"wrote {out} ({scheme}); public key {'added to ' + str(registry) if registry else 'in the key file'}")


def app_dir(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the Flower app (pyproject.toml)")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing directory")] = False,
) -> None:
    """Write the Flower app directory to run the patchlm ServerApp/ClientApp with `flwr run` across machines.

    Example: `patchlm federate-app --out fedapp && flwr run fedapp my-superlink --run-config 'config="/runs/fed/federate.json"'`
    """
    from patchlm.federated.flower.deploy import write_app
    from patchlm.paths import check_output

    check_output(out, force)
    write_app(out)
    status(f"wrote {out / 'pyproject.toml'}")


def register(app: typer.Typer) -> None:
    app.command("federate")(federate)
    app.command("federate-keygen")(keygen)
    app.command("federate-app")(app_dir)
