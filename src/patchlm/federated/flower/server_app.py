"""The Flower ServerApp: reads the run's federate.json (run config key `config`) and runs PatchlmStrategy.

Run it on a SuperLink with `flwr run <app dir> <connection> --run-config 'config="/path/to/federate.json"'`
(see README, "Federated training"); `patchlm federate` does all of that on one machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from patchlm.federated.config import SEED_AGGREGATIONS, FedConfig
from patchlm.federated.flower.seed_strategy import SeedStrategy
from patchlm.federated.flower.strategy import PatchlmStrategy
from patchlm.paths import atomic_write_text

app = ServerApp()


def _log(msg: str) -> None:
    print(f"[patchlm server] {msg}", flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = Path(str(context.run_config.get("config", "")) or os.environ.get("PATCHLM_FED_CONFIG", ""))
    if not path.is_file():
        raise FileNotFoundError(f"federate.json not found at {path!s}; "
                                "pass --run-config 'config=\"DIR/federate.json\"'")
    cfg = FedConfig.from_dict(json.loads(path.read_text()))
    cls = SeedStrategy if cfg.aggregation in SEED_AGGREGATIONS else PatchlmStrategy
    strategy = cls(cfg, cfg.out or path.parent, log=_log)
    try:
        strategy.start(grid)
    except BaseException as e:  # leave a trace the launcher can read, then fail the run
        atomic_write_text(Path(cfg.out or path.parent) / "server-error.txt", f"{type(e).__name__}: {e}\n", mode=0o644)
        raise
