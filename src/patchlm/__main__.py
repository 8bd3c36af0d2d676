"""`python -m patchlm ...` (and `torchrun --nproc-per-node N -m patchlm train ...`): the patchlm CLI.

Under a multi-process launch, ranks other than 0 keep quiet: their output is held back (one report, one --json
document) and shown only if that rank fails, so an error on any rank is still seen."""

import io
import os
import sys

from patchlm.cli.main import main


def _quiet_rank() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def run() -> None:
    """main(), with a non-zero rank's stdout and stderr held back unless it fails."""
    if not _quiet_rank():
        main()
        return
    real_err, held = sys.stderr, io.StringIO()
    sys.stdout, sys.stderr = io.StringIO(), held
    ok = False
    try:
        main()
        ok = True
    except SystemExit as e:
        ok = e.code in (None, 0)
        raise
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, real_err
        if not ok:
            real_err.write(f"[rank {os.environ.get('RANK')}] " + held.getvalue())


if __name__ == "__main__":
    run()
