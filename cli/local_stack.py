"""The whole Lifelong stack on one machine, natively, on loopback: what ``docker/compose.yaml`` runs
in containers, started from this venv (``make stack``, ``python -m lifelong.cli.stack up``).

Services, each a process (group) of its own with a health check and a log in the stack's folder
(``.lifelong/stack/`` by default):

=================  ==============================================  =======================================
service            command                                         healthy when
=================  ==============================================  =======================================
``mlflow``         ``mlflow server`` (SQLite by default, or         ``GET /health`` answers 200
                   ``$LIFELONG_STACK_MLFLOW_BACKEND_URI``, e.g.
                   PostgreSQL), artifacts proxied into the folder
``prefect-server`` ``prefect server start`` (SQLite by default, or  ``GET /api/health`` answers 200
                   ``$LIFELONG_STACK_PREFECT_DATABASE_URL``)
``prefect-worker`` ``prefect worker start --type process`` on the   its health server answers 200
                   work pool ``lifelong`` (created if missing)
``superlink``,     Flower's SuperLink and N SuperNodes, started by  ``/health`` answers, then N nodes online
``supernodeI``     :class:`lifelong.cli.deploy.LocalDeployment`
=================  ==============================================  =======================================

Every process gets ``LIFELONG_STACK_ID=<id>`` in its environment, and so does everything it starts
(uvicorn workers, Flower's ServerApp and ClientApp processes). Stopping the stack — at once, from a
foreground ``serve`` on Ctrl-C, or later from another process through the state file
``stack.json`` — signals every process that carries the id, then kills whatever is left: no orphan,
whichever process started it, and never a process of somebody else's (a recycled pid has a
different environment).

Bad input is refused before anything starts where it can be (a port in use, a missing service
binary); a service that exits or does not become healthy in time stops everything already started,
and the error names the service and its log file.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from lifelong.cli.deploy import CONNECTION, DeploymentError, LocalDeployment
from lifelong.cli.supervisor import (
    Supervisor,
    create_mlflow_schema,
    free_port,
    http_ok,
    kill,
    port_free,
    processes,
)
from lifelong.env import prefect_home

BIN = Path(sys.executable).parent
STACK_ID_VAR = "LIFELONG_STACK_ID"
STATE_FILE = "stack.json"
WORK_POOL = "lifelong"
DEFAULT_PORTS = {"mlflow": 5000, "prefect-server": 4200, "prefect-worker": 8085, "superlink": 9093}
#: Seconds each service may take to become healthy (2 busy cores: Prefect's server is the slowest).
DEFAULT_TIMEOUTS = {"mlflow": 90.0, "prefect-server": 120.0, "prefect-worker": 60.0, "flower": 90.0}


class StackError(RuntimeError):
    """A service that could not start or stop; the message names it and its log file."""


@dataclass
class Stack:
    """``Stack(workdir).up()`` … ``.down()``; or ``with Stack(workdir) as s: ...``.

    ``ports``: any of ``mlflow``, ``prefect-server``, ``prefect-worker`` (its health server),
    ``superlink``; 0 picks a free port. ``mlflow_backend_uri`` / ``prefect_database_url`` default
    to ``$LIFELONG_STACK_MLFLOW_BACKEND_URI`` / ``$LIFELONG_STACK_PREFECT_DATABASE_URL`` or SQLite
    files in ``workdir``.
    """

    workdir: Path = Path(".lifelong/stack")
    ports: dict[str, int] = field(default_factory=dict)
    n_supernodes: int = 2
    host: str = "127.0.0.1"
    mlflow_backend_uri: str | None = None
    prefect_database_url: str | None = None
    prefect_ui: bool = True
    timeouts: dict[str, float] = field(default_factory=dict)
    bin_dir: Path = BIN
    stack_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.ports = {k: (self.ports.get(k, v) or free_port()) for k, v in DEFAULT_PORTS.items()}
        self.timeouts = {**DEFAULT_TIMEOUTS, **self.timeouts}
        self.mlflow_backend_uri = (self.mlflow_backend_uri or os.environ.get("LIFELONG_STACK_MLFLOW_BACKEND_URI")
                                   or f"sqlite:///{self.workdir / 'mlflow.db'}")
        self.prefect_database_url = (
            self.prefect_database_url or os.environ.get("LIFELONG_STACK_PREFECT_DATABASE_URL")
            or f"sqlite+aiosqlite:///{self.workdir / 'prefect.db'}")
        self.supervisor = Supervisor(StackError)
        self.health_urls: dict[str, str] = {}
        self.flower: LocalDeployment | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports['mlflow']}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.ports['prefect-server']}/api"

    @property
    def superlink_address(self) -> str:
        return f"{self.host}:{self.ports['superlink']}"

    def log_file(self, service: str) -> Path:
        if service == "superlink" or service.startswith("supernode"):
            return self.workdir / "flower" / f"{service}.log"
        return self.workdir / f"{service}.log"

    def exports(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}

    # ------------------------------------------------------------------ start

    def up(self) -> Stack:
        """Start every service and wait until each is healthy; on any failure stop them all."""
        self._preflight()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # Servers boot side by side (most of their start-up is imports); the worker needs the
            # Prefect API, so it starts once that answers.
            self._spawn_mlflow()
            self._spawn("prefect-server", ["prefect", "server", "start", "--host", self.host,
                                           "--port", str(self.ports["prefect-server"])],
                        self._prefect_server_env(), f"{self.prefect_api_url}/health")
            self.flower = LocalDeployment(self.workdir / "flower", num_nodes=self.n_supernodes,
                                          port=self.ports["superlink"], timeout=self.timeouts["flower"],
                                          env={STACK_ID_VAR: self.stack_id})
            try:
                self.flower.start()
            except DeploymentError as exc:
                raise StackError(str(exc)) from None
            self._wait_healthy("mlflow")
            self._wait_healthy("prefect-server")
            self._spawn("prefect-worker", ["prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process",
                                           "--with-healthcheck", "--name", f"lifelong-{self.stack_id}"],
                        self._prefect_worker_env(), f"http://{self.host}:{self.ports['prefect-worker']}/health")
            self._wait_healthy("prefect-worker")
            self._write_state()
        except BaseException:
            self.down()
            raise
        return self

    def _preflight(self) -> None:
        for name in ("mlflow", "prefect"):
            exe = self.bin_dir / name
            if not exe.exists():
                raise StackError(f"{'prefect-server' if name == 'prefect' else name}: {exe} not found; "
                                 "install the project into this venv (make install)")
        flower_bin = Path(sys.executable).parent
        for name in ("flower-superlink", "flower-supernode", "flwr"):
            if not (flower_bin / name).exists():
                raise StackError(f"{'superlink' if name != 'flower-supernode' else 'supernode0'}: "
                                 f"{flower_bin / name} not found; install Flower into this venv (make install)")
        for service, uri in (("mlflow", self.mlflow_backend_uri), ("prefect-server", self.prefect_database_url)):
            if package := missing_driver(uri):
                raise StackError(f"{service}: the backend {_redact(uri)} needs a database driver this venv lacks: "
                                 f"pip install {package} (its log would be {self.log_file(service)})")
        if (self.workdir / STATE_FILE).exists() and self.running_from_state():
            raise StackError(f"a stack is already running from {self.workdir}; stop it first "
                             f"(python -m lifelong.cli.stack down --workdir {self.workdir})")
        for service, port in self.ports.items():
            if not port_free(port, self.host):
                raise StackError(f"{service}: port {port} on {self.host} is already in use; stop what "
                                 f"holds it or choose another port (its log would be {self.log_file(service)})")

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") and k not in ("MLFLOW_TRACKING_URI",)}
        env.update({STACK_ID_VAR: self.stack_id, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
        return env

    def _prefect_server_env(self) -> dict[str, str]:
        home = self.workdir / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        return {**self._base_env(), **prefect_home(home),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.prefect_database_url,
                "PREFECT_UI_ENABLED": "true" if self.prefect_ui else "false",
                "PREFECT_UI_API_URL": self.prefect_api_url}

    def _prefect_worker_env(self) -> dict[str, str]:
        home = self.workdir / "prefect-worker-home"
        home.mkdir(parents=True, exist_ok=True)
        return {**self._base_env(), **prefect_home(home), "PREFECT_API_URL": self.prefect_api_url,
                "PREFECT_WORKER_WEBSERVER_HOST": self.host,
                "PREFECT_WORKER_WEBSERVER_PORT": str(self.ports["prefect-worker"])}

    def _spawn_mlflow(self) -> None:
        uri = self.mlflow_backend_uri
        if uri.startswith("sqlite:"):
            create_mlflow_schema(uri)
        env = {**self._base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._spawn("mlflow", ["mlflow", "server", "--backend-store-uri", uri,
                               "--artifacts-destination", str(self.workdir / "mlartifacts"),
                               "--host", self.host, "--port", str(self.ports["mlflow"]), "--workers", "1"],
                    env, f"{self.mlflow_url}/health")

    def _spawn(self, name: str, args: list[str], env: dict[str, str], health_url: str) -> None:
        self.supervisor.start(name, [str(self.bin_dir / args[0]), *args[1:]], self.log_file(name), env,
                              cwd=self.workdir)
        self.health_urls[name] = health_url

    def _wait_healthy(self, name: str) -> None:
        url = self.health_urls[name]
        self.supervisor[name].wait_until(lambda: http_ok(url), self.timeouts[name],
                                         f" ({url} did not answer)")

    def _write_state(self) -> None:
        procs = [(p.name, p.pid, str(p.log)) for p in self.supervisor.processes]
        if self.flower is not None:
            procs += [(n, p.pid, str(self.flower.log_file(n))) for n, p in self.flower.procs]
        state = {"stack_id": self.stack_id, "workdir": str(self.workdir), "started": time.time(),
                 "urls": {"mlflow": self.mlflow_url, "prefect": self.prefect_api_url,
                          "superlink": self.superlink_address},
                 "health": dict(self.health_urls)
                 | {"superlink": f"http://{self.superlink_address}/health"},
                 "exports": self.exports(), "work_pool": WORK_POOL,
                 "processes": [{"service": n, "pid": p, "log": log} for n, p, log in procs]}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # ------------------------------------------------------------------ stop

    def down(self) -> None:
        """Stop every service of this stack and whatever they started; returns when none is left."""
        try:
            if self.flower is not None:
                flower, self.flower = self.flower, None
                flower.stop()
        finally:  # whatever Flower's stop raised, the other services stop too
            try:
                self.supervisor.stop(grace=15)
            finally:
                self.health_urls.clear()
                stop_stack_processes(self.stack_id)
                (self.workdir / STATE_FILE).unlink(missing_ok=True)

    def running_from_state(self) -> bool:
        try:
            state = json.loads((self.workdir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return bool(stack_processes(state.get("stack_id", "")))

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------ foreground

    def serve(self, echo=print) -> int:
        """Start, print the addresses, and stay up until Ctrl-C (or SIGTERM), or until a service dies."""
        self.up()
        stop = {"signal": None}

        def handler(signum, _frame):
            stop["signal"] = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            echo(describe(self))
            echo("serving; Ctrl-C stops every service")
            while stop["signal"] is None:
                dead = self.supervisor.first_exited() or (self.flower and self.flower.supervisor.first_exited())
                if dead:
                    echo(f"error: {dead.name} exited; see {self.log_file(dead.name)}. Stopping the stack.")
                    return 1
                time.sleep(0.5)
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.down()
            echo("stack stopped")


def describe(stack: Stack) -> str:
    ex = stack.exports()
    return "\n".join([
        f"Lifelong stack up ({stack.workdir}, id {stack.stack_id}):",
        f"  MLflow            {stack.mlflow_url}   (backend: {_redact(stack.mlflow_backend_uri)})",
        f"  Prefect API       {stack.prefect_api_url}"
        + (f"   (UI: http://{stack.host}:{stack.ports['prefect-server']})" if stack.prefect_ui else ""),
        f"  Prefect worker    work pool '{WORK_POOL}' (process)",
        f"  Flower SuperLink  {stack.superlink_address}   ({stack.n_supernodes} SuperNodes, insecure)",
        f"  logs              {stack.workdir}/*.log, {stack.workdir}/flower/*.log",
        "export these to use it:",
        *(f"  export {k}={v}" for k, v in ex.items()),
        "submit a federated run:",
        (f"  FLWR_HOME={stack.workdir}/flower/cli-home flwr run . {CONNECTION} "
        f"--run-config 'tracking-uri=\"{stack.mlflow_url}\"'"),
    ])


def _redact(uri: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db``."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        scheme, rest = uri.split("://", 1)
        cred, hostpart = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{hostpart}" if ":" in cred else uri
    return uri


# ---------------------------------------------------------------------- a detached stack


def read_state(workdir: Path) -> dict | None:
    try:
        return json.loads((Path(workdir).resolve() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def status(workdir: Path) -> dict:
    """Each service's health, read from a (detached) stack's state file; ``{}`` when none is there."""
    state = read_state(workdir)
    if state is None:
        return {}
    running = stack_processes(state["stack_id"])
    return {"stack_id": state["stack_id"], "processes": len(running), "urls": state["urls"],
            "exports": state["exports"],
            "services": {name: http_ok(url) for name, url in state["health"].items()}}


def down(workdir: Path, timeout: float = 15.0) -> int:
    """Stop the stack whose state file is in ``workdir``; returns how many processes it stopped."""
    workdir = Path(workdir).resolve()
    state = read_state(workdir)
    if state is None:
        return 0
    n = stop_stack_processes(state["stack_id"], timeout)
    (workdir / STATE_FILE).unlink(missing_ok=True)
    return n


def stack_processes(stack_id: str) -> list[int]:
    """Live processes whose environment carries ``LIFELONG_STACK_ID=stack_id`` (Linux ``/proc``)."""
    if not stack_id:
        return []
    marker = f"{STACK_ID_VAR}={stack_id}".encode()
    return [pid for pid, _ in processes(lambda _cmd, env: marker in env.split(b"\0"))]


def stop_stack_processes(stack_id: str, timeout: float = 15.0) -> int:
    """SIGTERM every process of the stack, SIGKILL what is left after ``timeout``."""
    pids = stack_processes(stack_id)
    for pid in pids:
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := stack_processes(stack_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (left := stack_processes(stack_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise StackError(f"processes of stack {stack_id} survived SIGKILL: {left}")
    return len(pids)


# ---------------------------------------------------------------------- helpers


#: Database URI schemes and the driver module each needs in this venv.
DRIVERS = {"postgresql": ("psycopg2", "psycopg2-binary"), "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
           "postgresql+asyncpg": ("asyncpg", "asyncpg"), "mysql": ("pymysql", "pymysql")}


def missing_driver(uri: str) -> str | None:
    """The pip package a database URI needs and this venv lacks, if any."""
    import importlib.util

    module, package = DRIVERS.get(uri.split("://", 1)[0], (None, None))
    return package if module and importlib.util.find_spec(module) is None else None
