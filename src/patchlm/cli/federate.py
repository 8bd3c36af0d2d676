"""Commands: federate (federated LoRA, or seeds and scalars, over a local Flower deployment), federate rebuild (the
model of any round as a patch), federate-keygen, federate-app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchlm.cli.common import print_json, print_table, status
from patchlm.cli.options import ConfigValues, Group, config_command
from patchlm.federated.config import RUN_TIMEOUT, FedConfig

_BF16 = FedConfig.__dataclass_fields__["bf16"]  # its own option below, to keep the --bf16/--fp32 pair


@config_command(Group(FedConfig, exclude=("bf16",)))
def federate(
    cv: ConfigValues,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help=_BF16.metadata["help"])] = _BF16.default,
    parallel_clients: Annotated[bool, typer.Option(
        "--parallel-clients", help="let local clients train at the same time (default: one at a time)")] = False,
    timeout: Annotated[float, typer.Option(help="overall time limit in seconds")] = RUN_TIMEOUT,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the run in OUT after its last completed round")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete OUT and start over")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the run summary as JSON")] = False,
) -> None:
    """Federated LoRA fine-tuning over a real Flower deployment on this machine (a SuperLink and one SuperNode per
    client on loopback), with FLoRA / FedIT / zero-padding / FFA-LoRA aggregation, signed updates and optional DP;
    or FedKSeed / Ferret (--aggregation fedkseed|ferret), which send seeds and scalars instead of tensors.

    Writes OUT/round-R/client-K/patch (K = client index), OUT/round-R/global/patch, OUT/final/patch and OUT/log.jsonl.

    Example: `patchlm federate --model tiny-random-llama --task sms_spam --clients 2 --rounds 2 --aggregation flora
    --ranks 4,2 --local-steps 3 --out runs/fed`
    """
    import click

    from patchlm.errors import ConfigError
    from patchlm.federated.flower.run import federate as run

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.invoked_subcommand is not None:  # `patchlm federate rebuild ...`
        return
    if out is None:
        raise ConfigError("federate needs --out DIR (the run directory)")
    cfg = FedConfig(**cv.values(FedConfig), bf16=bf16)
    if not timeout > 0 or timeout == float("inf"):  # checked before the Flower deployment starts
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
    summary = run(cfg, out, resume=resume, force=force, sequential=not parallel_clients, timeout=timeout,
                  log=None if json_out else status)
    if json_out:
        print_json(summary)
        return
    rows = [{**r, "rejected": len(r["rejected"])} for r in summary["rounds"]]
    print_table(rows, ["round", "num_updates", "rejected", "aggregation_error", "eval_accuracy", "eval_perplexity",
                       "bytes_up", "bytes_down", "round_time_s"], title=f"federate {summary['aggregation']} -> {out}")
    status(f"final patch: {summary['final_patch']}")


def rebuild(
    run: Annotated[Path, typer.Argument(help="a federated run directory (patchlm federate --out)")],
    round_: Annotated[int, typer.Option("--round", "-r", help="the round whose model to write (0 = before any)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="patch directory to write")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing patch directory")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False,
) -> None:
    """Write the model of round R of a federated run as a patch: replayed from the seeds and scalars (fedkseed,
    ferret: a lora patch for scheme lora, a merged patch of dense deltas for scheme full) or the stacked global
    LoRA updates of rounds 1..R (flora, fedit, zeropad, ffa).

    Example: `patchlm federate rebuild runs/fed --round 2 --out runs/fed-round2`
    """
    from patchlm.federated.flower.seed_task import rebuild as do_rebuild
    from patchlm.paths import check_output

    check_output(out, force)
    path, info = do_rebuild(run, round_, out, force=force)
    info = {"patch": str(path), **info}
    if json_out:
        print_json(info)
    else:
        status(f"wrote {path} ({info['kind']} patch of round {round_})")


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
    # read (and so check) the registry before anything is written: a broken one leaves no orphan key file
    reg = (KeyRegistry.load(registry) if registry.exists() else KeyRegistry()) if registry is not None else None
    kp = KeyPair.generate(scheme)
    if reg is not None:
        reg.add(identity, scheme, kp.public_key)
    kp.save(out)
    if reg is not None:
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

    Example: `patchlm federate-app --out fedapp && flwr run fedapp my-superlink
    --run-config 'config="/runs/fed/federate.json"'`
    """
    from patchlm.federated.flower.deploy import write_app
    from patchlm.paths import check_output

    check_output(out, force)
    write_app(out)
    status(f"wrote {out / 'pyproject.toml'}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(add_completion=False, rich_markup_mode="markdown")
    group.callback(invoke_without_command=True)(federate)
    group.command("rebuild")(rebuild)
    app.add_typer(group, name="federate")
    app.command("federate-keygen")(keygen)
    app.command("federate-app")(app_dir)
