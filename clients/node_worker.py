"""The warm path of a deployed SuperNode: one long-lived worker process per node trains its rounds.

Why. flwr 1.42 starts a fresh ``flwr-clientapp`` process for every message a SuperNode gets, and
the process handles that one message and exits. Importing the learning stack there (PyTorch,
Avalanche: 8–12 s and ~1.4 GB a message, measured 2026-12) made a deployed round ~20× an
in-process one. Flower's warm executors exist only for its Kubernetes app pods, so Lifelong keeps
its own: the per-message process stays import-light (Flower, the standard library) and hands the
message to this node's worker, which imports the stack once and keeps its Avalanche workers
(``bridges/avalanche/worker.py``) between rounds, as a Ray actor does in simulation.

Nothing a client must remember lives in the worker. The message's content and the node's
``Context.state`` travel to it, serialised with Flower's own protobuf codec, and the reply and
the updated state travel back; the SuperNode keeps the state, as without a worker. A worker that
dies (killed, out of memory) costs the round in flight — the ClientApp raises, and Flower reports
a failed client as for any other exception — and the next message starts a new one.

Which process does what:

* ``call`` (the per-message ClientApp process): connect to the node's worker over a Unix socket
  (``multiprocessing.connection``, authenticated with a key only this user can read); if none is
  listening, start one — under a file lock, so two messages never start two — and wait until it
  listens (it listens only once its imports are done).
* ``serve`` (the worker, ``python -m lifelong.clients.node_worker``): answer messages one at a time
  with ``clients/round.py``; exit when the node's process that started the ClientApp is gone or
  after ``LIFELONG_NODE_WORKER_IDLE_S`` seconds without a message (default 1,800).

A node is named by the process that starts its ClientApp processes (their parent, Flower's
``flower-superexec`` of that SuperNode), so two SuperNodes on one host have two workers.
``LIFELONG_NODE_WORKER=off`` turns the warm path off (each message then imports the stack).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

SWITCH = "LIFELONG_NODE_WORKER"
IDLE_VAR = "LIFELONG_NODE_WORKER_IDLE_S"
#: Seconds a new worker may take to import the stack and listen before the message fails.
START_TIMEOUT_S = 300.0


class NodeWorkerError(RuntimeError):
    """The node's worker could not be started, or died while handling a message; names its log."""


# --------------------------------------------------------------------------- which process hands off
def wanted() -> bool:
    """True in a deployed SuperNode's per-message ClientApp process (unless switched off).

    The in-process backend and Ray's actors are long-lived already: they handle messages
    themselves."""
    switch = os.environ.get(SWITCH, "auto").lower()
    if switch not in ("auto", "on", "off"):
        raise ValueError(f"{SWITCH}={switch!r}: expected auto, on or off")
    if switch != "auto":
        return switch == "on"
    return "flwr.supernode.runtime.run_clientapp" in sys.modules


# --------------------------------------------------------------------------- where a node's worker listens
def home() -> Path:
    """A folder only this user can enter: the sockets, keys, locks and logs of this host's workers."""
    path = Path(tempfile.gettempdir()) / f"lifelong-node-workers-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise NodeWorkerError(f"{path} is not private to this user; remove it")
    return path


def paths(node: int) -> dict[str, Path]:
    base = home() / f"node-{node}"
    return {k: base.with_suffix(f".{k}") for k in ("sock", "key", "lock", "log")}


def _encode(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def _decode(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# --------------------------------------------------------------------------- the per-message side
def call(content: RecordDict, state: RecordDict, node_config: Mapping[str, object],
         node: int | None = None) -> RecordDict:
    """The reply's content to a train message, from this node's worker; ``state`` is updated in place.
    ``node``: the pid that names the node (default: this process's parent, the SuperNode's)."""
    node = os.getppid() if node is None else node
    p = paths(node)
    conn = _connect(p) or _start(p, node)
    try:
        with conn:
            conn.send({"content": _encode(content), "state": _encode(state), "node_config": dict(node_config)})
            reply = conn.recv()
    except (EOFError, OSError) as exc:
        raise NodeWorkerError(f"the node worker died while training ({exc!r}); see {p['log']}") from None
    if "error" in reply:
        raise NodeWorkerError(f"the node worker failed: {reply['error']}")
    new_state = _decode(reply["state"])
    for key in list(state.keys()):
        del state[key]
    for key, value in new_state.items():
        state[key] = value
    return _decode(reply["content"])


def _connect(p: dict[str, Path]) -> Connection | None:
    try:
        return Client(str(p["sock"]), family="AF_UNIX", authkey=p["key"].read_bytes())
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _start(p: dict[str, Path], node: int) -> Connection:
    with open(p["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per node; the others wait here, then connect
        if (conn := _connect(p)) is not None:
            return conn
        _forget_dead_nodes()
        p["sock"].unlink(missing_ok=True)  # a dead worker's socket
        p["key"].write_bytes(secrets.token_bytes(32))
        p["key"].chmod(0o600)
        # The worker imports what this process would: the same interpreter and search path (a
        # SuperNode may have put the app's own folder first).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(d for d in sys.path if d and os.path.isdir(d))}
        with open(p["log"], "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lifelong.clients.node_worker", "--node", str(node)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (conn := _connect(p)) is None:
            if proc.poll() is not None:
                raise NodeWorkerError(f"the node worker exited at start (code {proc.returncode}); see {p['log']}")
            if time.monotonic() > deadline:
                proc.kill()
                raise NodeWorkerError(f"the node worker did not listen within {START_TIMEOUT_S:.0f} s; "
                                      f"see {p['log']}")
            time.sleep(0.05)
        return conn


def _forget_dead_nodes() -> None:
    """Remove the files of workers whose node is gone (a worker killed outright leaves them)."""
    for f in home().glob("node-*.*"):
        pid = f.name.split(".")[0].removeprefix("node-")
        if pid.isdigit() and not _alive(int(pid)):
            f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the worker
def serve(node: int, idle_s: float) -> None:
    """Handle messages until ``node`` (the process that starts this node's ClientApps) is gone or
    none came for ``idle_s`` seconds."""
    from lifelong.clients.round import train_reply  # the stack: imported once, before listening

    p = paths(node)
    listener = Listener(str(p["sock"]), family="AF_UNIX", authkey=p["key"].read_bytes())
    print(f"[node worker {os.getpid()}] listening for node {node} at {p['sock']}", flush=True)
    clock = {"last": time.monotonic(), "busy": False}
    signal.signal(signal.SIGTERM, lambda *_: _exit(p, "stopped"))
    threading.Thread(target=_watch, args=(node, idle_s, clock, p), daemon=True).start()
    while True:
        with listener.accept() as conn:
            clock["busy"] = True
            request = conn.recv()
            t0 = time.perf_counter()
            try:
                state = _decode(request["state"])
                content = train_reply(_decode(request["content"]), state, request["node_config"])
                conn.send({"content": _encode(content), "state": _encode(state)})
                print(f"[node worker {os.getpid()}] message answered in {time.perf_counter() - t0:.2f} s "
                      f"({len(request['state']) / 1e6:.1f} MB of client state)", flush=True)
            except Exception as exc:  # noqa: BLE001  (any failure is the message's; the worker goes on)
                traceback.print_exc()
                conn.send({"error": f"{type(exc).__name__}: {exc}"})
            finally:
                clock.update(last=time.monotonic(), busy=False)


def _watch(node: int, idle_s: float, clock: dict, p: dict[str, Path]) -> None:
    """End the worker (it blocks in ``accept``) once its node is gone or it has been idle too long."""
    while _alive(node) and (clock["busy"] or time.monotonic() - clock["last"] < idle_s):
        time.sleep(0.25)
    _exit(p, "node gone" if not _alive(node) else f"idle for {idle_s:.0f} s")


def _exit(p: dict[str, Path], why: str) -> None:
    print(f"[node worker {os.getpid()}] {why}: exiting", flush=True)
    for key in ("sock", "key", "lock"):
        p[key].unlink(missing_ok=True)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", type=int, required=True, help="the pid that names the node")
    args = parser.parse_args(argv)
    serve(args.node, float(os.environ.get(IDLE_VAR, "1800")))


if __name__ == "__main__":
    main()
