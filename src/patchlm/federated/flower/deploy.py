"""A real Flower deployment on one machine: one SuperLink and N SuperNodes as local processes on loopback,
the patchlm Flower app submitted with `flwr run`, and a clean shutdown of every process afterwards, even on
failure (each process tree is tracked with psutil and terminated, then killed; also at interpreter exit).

With flwr >= 1.40 the Fleet, Control and runtime APIs of the SuperLink share one HTTP port and each SuperNode
serves its ClientApp runtime on its own port; all ports are chosen free at run time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil

from patchlm.errors import PatchlmError

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "patchlm-federated"
version = "1.0.0"
description = "patchlm federated LoRA (FLoRA, FedIT, zero-padding, FFA-LoRA) with signed updates and DP"
license = "Apache-2.0"
dependencies = ["patchlm"]

[tool.flwr.app]
publisher = "patchlm"

[tool.flwr.app.components]
serverapp = "patchlm.federated.flower.server_app:app"
clientapp = "patchlm.federated.flower.client_app:app"

[tool.flwr.app.config]
config = ""
"""


def write_app(directory: str | Path) -> Path:
    """Write the Flower app directory (a pyproject.toml naming patchlm's ServerApp and ClientApp)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(APP_PYPROJECT)
    (d / "README.md").write_text("patchlm federated app: `flwr run . <connection> --run-config "
                                 "'config=\"/path/to/federate.json\"'`\n")
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise PatchlmError(f"{what} exited with code {proc.returncode} at start; see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise PatchlmError(f"{what} did not open port {port} within {timeout:.0f} s; see {log}")


class LocalDeployment:
    """SuperLink + SuperNodes as process trees; `with LocalDeployment(...) as d: d.run(...)`."""

    def __init__(self, workdir: str | Path, node_configs: list[dict], env: dict | None = None, log=None):
        self.workdir = Path(workdir)
        self.node_configs = node_configs
        self.log = log or (lambda m: None)
        self.procs: list[subprocess.Popen] = []
        self.known: dict[int, psutil.Process] = {}
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **(env or {}), "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "FLWR_HOME": str(self.workdir / "flwr-home"), "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.port = None
        self._closed = False

    # -- processes
    def _spawn(self, args: list[str], logname: str) -> subprocess.Popen:
        with open(self.workdir / "logs" / logname, "ab") as logf:
            p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                 start_new_session=True)
        self.procs.append(p)
        self._track()
        return p

    def _track(self) -> None:
        """Remember every descendant (Flower starts SuperExec and app processes in their own sessions)."""
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    self.known.setdefault(q.pid, q)
            except psutil.NoSuchProcess:
                continue

    def start(self) -> LocalDeployment:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr-home").mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        self.port = free_port()
        sl = self._spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                          "--disable-runtime-dependency-installation"], "superlink.log")
        _wait_port(self.port, 60, sl, "flower-superlink", self.workdir / "logs" / "superlink.log")
        (self.workdir / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            'insecure = true\n')
        for i, nc in enumerate(self.node_configs):
            conf = " ".join(f"{k}={_toml(v)}" for k, v in nc.items())
            self._spawn(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--port", str(free_port()), "--node-config", conf], f"supernode-{i}.log")
        self.log(f"SuperLink on 127.0.0.1:{self.port}, {len(self.node_configs)} SuperNodes")
        return self

    def run(self, app_dir: Path, run_config: dict, timeout: float, done=None) -> int:
        """`flwr run` the app and wait for it to finish (or `done()` to turn true, or the timeout)."""
        conf = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        p = self._spawn(["flwr", "run", str(app_dir), "local", "--stream", "--run-config", conf], "flwr-run.log")
        t0 = time.time()
        while p.poll() is None:
            self._track()
            if done is not None and done():
                time.sleep(1.0)
                break
            if time.time() - t0 > timeout:
                raise PatchlmError(f"federated run did not finish within {timeout:.0f} s; "
                                   f"logs in {self.workdir / 'logs'}")
            if any(q.poll() is not None for q in self.procs[:1]):
                raise PatchlmError("flower-superlink stopped during the run; "
                                   f"see {self.workdir / 'logs' / 'superlink.log'}")
            time.sleep(0.5)
        return p.returncode if p.returncode is not None else 0

    def stop(self) -> None:
        """Terminate every process tree (SIGTERM, then SIGKILL after 10 s); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._track()
        procs = list(self.known.values())
        for p in self.procs:  # the session leaders' groups first
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        for q in procs:
            with suppress(psutil.NoSuchProcess):
                q.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for q in alive:
            with suppress(psutil.NoSuchProcess):
                q.kill()
        psutil.wait_procs(alive, timeout=5)
        for p in self.procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        atexit.unregister(self.stop)

    def alive(self) -> list[int]:
        """Pids of tracked processes still running (zombies excluded)."""
        out = []
        for pid, q in self.known.items():
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                continue
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def cleanup_home(self) -> None:
        shutil.rmtree(self.workdir / "flwr-home" / "apps", ignore_errors=True)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
