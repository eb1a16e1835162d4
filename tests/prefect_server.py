"""Test helper: a real Prefect server on loopback, and background processes that leave nothing behind.

Why a real server: Prefect's ephemeral API runs no scheduler and dies with its process, so
deployments and schedules can only be tested against ``prefect server start``. Each server gets
its own ``PREFECT_HOME`` and SQLite database in a temporary folder, a free port on 127.0.0.1, and
its own session (process group): stopping it signals the whole group, then waits until no process
of the group is left, so no uvicorn or service process outlives the tests.

Usage::

    with PrefectServer(tmp_path / "prefect") as server:
        env = {**os.environ, "PREFECT_API_URL": server.api_url}
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from lifelong.cli.supervisor import Process, free_port, group_members, http_ok
from lifelong.env import prefect_home

__all__ = ["Background", "PrefectServer", "group_members"]


class Background(Process):
    """A command in its own session (the project's one supervisor), its output in a log file.

    :meth:`stop` signals the leader alone, as a served ``prefect`` process expects of Ctrl-C (it
    ends its own flow-run processes), then ends whatever is left of the group.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: str | Path | None = None):
        super().__init__(" ".join(map(str, args[1:4])), args, log, env, cwd)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> int | None:
        return super().stop(sig, grace_s, leader_only=True)


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own home and SQLite database."""

    def __init__(self, home: Path, port: int | None = None, startup_timeout_s: float = 90.0,
                 database: str | None = None):
        self.home = Path(home)
        #: The server's database (a SQLAlchemy URL, e.g. PostgreSQL's); default SQLite in ``home``.
        self.database = database
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.process: Background | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")}
        env.update({
            **prefect_home(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database or f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",  # no static files to build or serve
            "DO_NOT_TRACK": "true",
        })
        return env

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "prefect", "server", "start",
                "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = Background(args, self.env(), self.home / "server.log")
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.process.alive():
                tail = self.process.log_tail()
                self.stop()
                raise RuntimeError(f"prefect server exited while starting:\n{tail}")
            if self.healthy():
                return self
            time.sleep(0.25)
        tail = self.process.log_tail()
        self.stop()
        raise RuntimeError(f"prefect server did not answer {self.api_url}/health in "
                           f"{self.startup_timeout_s:.0f} s:\n{tail}")

    def healthy(self) -> bool:
        return http_ok(f"{self.api_url}/health")

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log_tail(chars) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGTERM, grace_s=15)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
