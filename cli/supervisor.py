"""The one process supervisor: every server Lifelong starts on this machine — the local stack's
services, a Flower deployment's SuperLink and SuperNodes, and the test suite's servers — runs as
a :class:`Process` here.

A process runs in a session of its own (so it and its children form one process group), its
output in one log file, stdin closed, SIGINT at its default (a shell without job control hands its
children an ignored SIGINT, and a Ctrl-C sent to stop a served process would be lost). It is
waited on until a readiness check passes; while waiting, a process that exits is an error naming
it and its log. Stopping signals the group, waits, kills what is left of the group, and then ends
the descendants that had left it: Flower's SuperLink starts its executor (and the ServerApp) in
sessions of their own, out of reach of ``killpg``. Processes are read from Linux's ``/proc``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path


class Process:
    """``Process(name, argv, log, env)``: started at once; :meth:`stop` leaves nothing behind."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, error: type[Exception] = RuntimeError):
        self.name, self.argv, self.log, self.error = name, [str(a) for a in argv], Path(log), error
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pid = self.pgid = self.proc.pid  # a new session's leader: its pid is the group's id

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise self.error(f"{self.name}: exited with code {self.proc.returncode} while starting; "
                             f"see {self.log}")

    def wait_until(self, ready: Callable[[], bool], timeout: float, detail: str = "") -> None:
        """Poll ``ready`` until it holds; an exit or ``timeout`` seconds raise, naming the log."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_running()
            if time.monotonic() > deadline:
                raise self.error(f"{self.name}: not healthy after {timeout:g} s{detail}; see {self.log}")
            time.sleep(0.2)

    def send(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, grace: float) -> int | None:
        """After a signal: wait up to ``grace`` s for the leader, then kill what is left of the group."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for last in (signal.SIGTERM, signal.SIGKILL):
            if not group_members(self.pgid):
                break
            self.send(last)
            deadline = time.monotonic() + 5
            while group_members(self.pgid) and time.monotonic() < deadline:
                self.proc.poll()  # reap the leader, so that it stops counting
                time.sleep(0.1)
        if self.alive():
            self.proc.kill()
        code = self.proc.wait(10)
        if left := group_members(self.pgid):
            raise self.error(f"processes left behind by {self.name}: {left}")
        return code

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0, leader_only: bool = False) -> int | None:
        """Signal the group (or, as a program's own Ctrl-C handling expects, its leader alone), wait,
        kill what is left, descendants in sessions of their own too; returns the leader's exit
        code and raises if a process survives SIGKILL."""
        family = descendants(self.pid)
        if leader_only:
            if self.alive():  # (a reaped leader's pid may belong to another process by now)
                kill(self.pid, sig)
        else:
            self.send(sig)
        code = self.finish(grace)
        end_all(family, self.error, self.name)
        return code


class Supervisor:
    """Several processes started side by side and stopped together (all are signalled first)."""

    def __init__(self, error: type[Exception] = RuntimeError):
        self.error = error
        self.processes: list[Process] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> Process:
        if not Path(argv[0]).exists():
            raise self.error(f"{name}: {argv[0]} not found; install the project into this venv (make install)")
        process = Process(name, argv, log, env, cwd, self.error)
        self.processes.append(process)
        return process

    def __getitem__(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def check_running(self) -> None:
        for process in self.processes:
            process.check_running()

    def first_exited(self) -> Process | None:
        return next((p for p in self.processes if not p.alive()), None)

    def stop(self, grace: float = 15.0) -> None:
        """Every process is finished, and every straggler ended, even when one of them fails to
        stop; then the first failure is raised."""
        family = [d for p in self.processes for d in descendants(p.pid)]
        for process in self.processes:
            process.send(signal.SIGTERM)
        errors: list[Exception] = []
        for process in self.processes:
            try:
                process.finish(grace)
            except Exception as exc:  # (a process left behind: the others still get stopped)
                errors.append(exc)
        names = ", ".join(p.name for p in self.processes)
        self.processes.clear()
        try:
            end_all(family, self.error, names)
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------- processes, ports, health


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            kids = []
        out += kids
        todo += kids
    return out


def _stat(proc: Path) -> tuple[str, int]:
    """A process's state and process group: fields of ``/proc/PID/stat`` after the command, which
    is in parentheses and may hold spaces."""
    state, _ppid, pgrp = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
    return state, int(pgrp)


def _cmdline(proc: Path) -> str:
    return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    try:
        state, _ = _stat(Path(f"/proc/{pid}"))
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent (or init) reaps it


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_all(pids: Iterable[int], error: type[Exception] = RuntimeError, owner: str = "",
            timeout: float = 10.0) -> None:
    """Wait for ``pids`` to exit (they do once their parent has gone), SIGKILL what stays."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (left := [p for p in left if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise error(f"processes of {owner or 'a service'} survived SIGKILL: {left}")


def processes(match: Callable[[str, bytes], bool]) -> list[tuple[int, str]]:
    """Live processes (but this one) for which ``match(command line, environment)`` holds."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if _stat(entry)[0] == "Z":
                continue
            cmd, env = _cmdline(entry), (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if match(cmd, env):
            found.append((int(entry.name), cmd))
    return found


def group_members(pgid: int) -> list[str]:
    """Live processes of a process group, as ``pid command`` lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, pgrp = _stat(entry)
            if pgrp != pgid or state == "Z":
                continue
            cmd = _cmdline(entry)
        except (OSError, ValueError, IndexError):
            continue
        found.append(f"{entry.name} {cmd}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def create_mlflow_schema(uri: str) -> None:
    """Run MLflow's migrations on a SQLite store in this process: the server's CLI would run every
    one before it starts (~10 s of a ~16 s start on 2 busy cores)."""
    import logging

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)  # not "Creating initial MLflow database tables..." on every start
    try:
        # The Default experiment gets the root the server would give it.
        store = SqlAlchemyStore(uri, default_artifact_root="mlflow-artifacts:/")
        store.engine.dispose()
    finally:
        logger.setLevel(level)
