"""A real Flower deployment on this machine: a SuperLink and N SuperNodes as separate processes,
and the app submitted with ``flwr run`` — the same commands a multi-machine deployment uses.

flwr 1.42's processes, and what each needs (README, "Deploying clients"):

* ``flower-superlink --insecure --host H --port P``: one HTTP port serves the Fleet, Control and
  Runtime APIs; ``--disable-runtime-dependency-installation`` because the app's dependencies are
  this venv (by default the SuperLink ``uv sync``s them for every run, from the network).
* ``flower-supernode --insecure --superlink H:P --port Q --node-config "partition-id=i
  num-partitions=N"``: every SuperNode on one host needs its own ``--port``; it starts one
  ``flwr-clientapp`` process per message, and keeps the node's ``Context.state`` between them.
* ``flwr run APP CONNECTION --run-config ...``: the connection is read from
  ``$FLWR_HOME/config.toml`` (not from pyproject); ``flwr run --stream`` exits 0 even when the run
  failed, so the outcome is read back with ``flwr ls --run-id``.

SuperLink and SuperNodes start their helper processes by bare name, so the venv's ``bin`` goes
first on their PATH. Each process gets its own ``FLWR_HOME`` and process group; stopping the
deployment stops every group, and errors name the service and its log file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lifelong.cli.supervisor import Supervisor, free_port, http_ok, port_free

BIN = Path(sys.executable).parent
CONNECTION = "lifelong-local"


class DeploymentError(RuntimeError):
    """A service that could not start or a run that did not complete; the message says which."""


def check_port_free(port: int, service: str) -> None:
    if not port_free(port):
        raise DeploymentError(f"{service}: port {port} on 127.0.0.1 is already in use; "
                              "stop what holds it or choose another port")


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    text = str(v)
    # A literal string keeps double quotes as they are (flwr's parser rejects escaped ones).
    if "'" not in text:
        return f"'{text}'"
    if '"' in text:
        raise DeploymentError(f"run config value {text!r} has both quote kinds, which flwr cannot parse")
    return f'"{text}"'



class LocalDeployment:
    """``with LocalDeployment(workdir, num_nodes=2) as dep: dep.run_app(app_dir, run_config)``."""

    def __init__(self, workdir: Path, num_nodes: int = 2, port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float = 60.0):
        self.dir = Path(workdir)
        self.num_nodes, self.timeout = num_nodes, timeout
        self.port = port or free_port()
        self.supervisor = Supervisor(DeploymentError)
        from lifelong.env import state_dir

        # LIFELONG_HOME made absolute: the ServerApp's checkpoints and the SuperNodes' client state
        # (clients/state_store.py) go where this process keeps them, whatever their working directory.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "LIFELONG_HOME": str(state_dir()),
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
        self.cli_home = self.dir / "cli-home"

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(p.name, p.proc) for p in self.supervisor.processes]

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        exe = BIN / args[0]
        if not exe.exists():
            raise DeploymentError(f"{name}: {exe} not found; install Flower into this venv (make install)")
        self.supervisor.start(name, [str(exe), *args[1:]], self.log_file(name),
                              {**self.env, "FLWR_HOME": str(self.dir / f"{name}-home"), **(env or {})})

    def start(self) -> "LocalDeployment":
        self.dir.mkdir(parents=True, exist_ok=True)
        check_port_free(self.port, "superlink")
        try:
            self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--disable-runtime-dependency-installation"])
            for i in range(self.num_nodes):
                self._spawn_node(i)
            self.cli_home.mkdir(exist_ok=True)
            (self.cli_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_node(self, i: int) -> None:
        # The SuperNodes share this machine's cores: each node's trainer (its warm worker,
        # clients/node_worker.py) gets its share of threads. Left to PyTorch's default, every
        # node would use all cores and the spinning threads of N trainers made a round ~30×
        # slower on 2 cores (11 s against 0.4 s, 2026-12-07).
        threads = str(max(1, (os.cpu_count() or 1) // self.num_nodes))
        self._spawn(f"supernode{i}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"],
            {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)})

    def restart_node(self, i: int) -> None:
        """Start SuperNode ``i`` again after it died: a new process (to the SuperLink, a new node)
        serving the same partition, whose client goes on from the state it saved
        (``clients/state_store.py``). The dead process's log is kept as ``supernodeI-before-restart.log``."""
        name = f"supernode{i}"
        old = self.supervisor[name]
        if old.alive():
            raise DeploymentError(f"{name} is still running (pid {old.pid}); stop it before restarting it")
        self.supervisor.processes.remove(old)
        self.log_file(name).rename(self.log_file(f"{name}-before-restart"))
        self._spawn_node(i)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        self.supervisor["superlink"].wait_until(self._superlink_up, self.timeout)
        while (online := self.online_nodes()) < self.num_nodes:
            self.supervisor.check_running()
            if time.monotonic() > deadline:
                raise DeploymentError(f"supernodes: {online} of {self.num_nodes} online after "
                                      f"{self.timeout:.0f} s; see {self.dir}/supernode*.log")
            time.sleep(0.2)

    def _superlink_up(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.port}/health", timeout=0.5)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env={**self.env, "FLWR_HOME": str(self.cli_home)},
                              capture_output=True, text=True, check=False)

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return sum(n.get("status") == "online" for n in json.loads(out.stdout)["nodes"])
        except (ValueError, KeyError):
            return 0

    def run_app(self, app_dir: Path, run_config: dict[str, object], timeout: float = 900) -> dict:
        """Submit the app, wait for the run to finish, and return its record from ``flwr ls``."""
        cfg = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        out = self.flwr("run", str(app_dir), CONNECTION, "--run-config", cfg, "--format", "json")
        try:
            run_id = str(json.loads(out.stdout)["run-id"])
        except (ValueError, KeyError):
            raise DeploymentError(f"flwr run: could not start the run:\n{out.stdout}\n{out.stderr}") from None
        log = self.log_file(f"run-{run_id}")
        try:  # returns when the run has finished
            logs = subprocess.run([str(BIN / "flwr"), "log", run_id, CONNECTION, "--stream"], check=False,
                                  env={**self.env, "FLWR_HOME": str(self.cli_home)},
                                  capture_output=True, text=True, timeout=timeout)
            log.write_text(logs.stdout + logs.stderr)
        except subprocess.TimeoutExpired:
            self.flwr("stop", run_id, CONNECTION)
            raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s; stopped") from None
        info = json.loads(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json").stdout)
        run = info["runs"][0]
        run["log"] = str(log)
        return run

    def stop(self) -> None:
        self.supervisor.stop(grace=10)

    def __enter__(self) -> "LocalDeployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def app_dir() -> Path:
    """The Flower app's directory: the project root, where ``pyproject.toml`` declares it."""
    return Path(__file__).resolve().parents[1]
