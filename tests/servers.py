"""Real servers on loopback for integration tests: an MLflow tracking server; and a check that
the processes a test started are gone (``processes_mentioning``).

``MlflowServer(workdir)`` runs ``mlflow server`` (SQLite backend, artifacts proxied into
``workdir``) on 127.0.0.1 and a free port, waits for its ``/health``, and stops it — the CLI and
its uvicorn worker — at the end. The server runs in a session of its own, so stopping signals
its whole process group and waits until no process of it is left: no orphans.

Start-up is kept short: one worker, MLflow's job runner (a separate Huey consumer) off, and the
SQLite schema created in this process first — otherwise the server's CLI runs every migration
before it starts uvicorn, which took ~10 s of a ~16 s start on 2 busy cores (~5 s with it done).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, workdir: Path, startup_timeout: float = 90.0):
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
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
        backend = f"sqlite:///{self.workdir / 'server.db'}"
        _create_schema(backend)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", str(self.workdir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env=env, start_new_session=True)
        self.pgid = self.proc.pid
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout:.0f} s:\n"
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout``; returns when it is empty."""
        if self.proc is None:
            return
        pgid = self.pgid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while group_alive(pgid) and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader so that it stops counting as alive
            time.sleep(0.1)
        if group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc.wait(timeout=5)
        self.proc = None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _create_schema(uri: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # Runs MLflow's migrations; the Default experiment gets the root the server would give it.
    store = SqlAlchemyStore(uri, default_artifact_root="mlflow-artifacts:/")
    store.engine.dispose()


def processes_mentioning(text: str, command: str | None = None) -> list[str]:
    """Live processes whose command line or environment mentions ``text`` (a test's temp folder:
    what it started has it in an argument or inherits it in a variable, and tests running
    meanwhile in other files have temp folders of their own); with ``command``, only those whose
    whole command line matches that regular expression."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (entry / "environ").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        if (text in cmd or text in env) and (command is None or re.search(command, cmd)):
            found.append(f"{entry.name} {cmd[:120]}")
    return found
