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
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[str]:
    """Live processes of a process group, as ``pid command`` lines (Linux: read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # fields after the command (which is in parentheses and may hold spaces)
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(pgrp) != pgid or state == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found.append(f"{entry.name} {cmd}")
    return found


class Background:
    """A command in its own session, its output in a log file; :meth:`stop` ends the whole group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: str | Path | None = None):
        self.args, self.log = args, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "wb")
        # SIGINT back to its default: a suite started in the background by a shell without job
        # control (`make test &`, nohup) has it ignored, and an ignored SIGINT is inherited, so
        # the "Ctrl-C" these tests send would be lost and the process stopped by SIGTERM instead.
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pgid = self.proc.pid  # a new session's leader: its pid is the group id

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> int | None:
        """Signal the leader, wait, then SIGTERM/SIGKILL whatever is left of the group.

        Returns the leader's exit code. Raises if a process of the group survives SIGKILL.
        """
        if self.alive():
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        for last in (signal.SIGTERM, signal.SIGKILL):
            if not group_members(self.pgid):
                break
            try:
                os.killpg(self.pgid, last)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while group_members(self.pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.alive():
            self.proc.kill()
        code = self.proc.wait(10)
        self._out.close()
        left = group_members(self.pgid)
        if left:
            raise RuntimeError(f"processes left behind by {self.args[:4]}: {left}")
        return code


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own home and SQLite database."""

    def __init__(self, home: Path, port: int | None = None, startup_timeout_s: float = 90.0):
        self.home = Path(home)
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
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
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
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log_tail(chars) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGTERM, grace_s=15)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
