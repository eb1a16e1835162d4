"""A federated client's state on the client's own disk, after every successful round.

Flower keeps a client's ``Context.state`` (``clients/state.py``) for one Flower run, in the process
that runs the client: our in-process grid, the Ray engine, a SuperNode — possibly on another
machine. A resumed run is a new Flower run (fresh, empty contexts), so each client persists its
own records, and the server, which cannot reach them, only says which round they must match:

* every train message of a checkpointed run carries the run key (``protocol.STATE_RUN``, the MLflow run id)
  and the last round the server has durably checkpointed (``protocol.SAVED_ROUND``);
* after a successful round r the client (one whose learner keeps state: ``ClientLearner.keeps_state``;
  a plain fine-tuner reads nothing back) writes its records, as round r of its partition, to the
  run's store and deletes its rounds older than the newest one at or below the server's
  checkpointed round — at most one round more than needed: the server may die after the
  client's round r and before its own checkpoint of r;
* a resumed run's messages also carry ``protocol.RESUME_ROUNDS``: the round each resume of the
  run went on from, oldest first. Their number is the run's *attempt* (0: never resumed), and each
  row records the attempt that wrote it;
* a client whose ``Context.state`` is empty — every client of a resumed run until it trains, a
  SuperNode that died and came back with the same partition (in a resumed run too), a virtual
  client whose context the in-process grid let go after its round (``clients/inprocess.py``) —
  loads its newest row from before the current round that this run can go on from: one its own
  attempt wrote, or one an earlier attempt wrote at or below the round the next attempt resumed
  from. The others — rounds an interrupted attempt trained after the checkpoint it was resumed
  from, which the resumed run redoes — are deleted; with none left it starts empty.

``<root>``: the node config's ``client-state-dir``
(``flower-supernode --node-config "partition-id=0 num-partitions=2 client-state-dir='/data/lifelong'"``),
else ``$LIFELONG_CLIENT_STATE_DIR``, else ``<LIFELONG_HOME>/client-state``, next to the server's
``checkpoints/``. A state that is corrupt or was written by another config is refused, never
silently used, and so is a missing state of a client the resumed run's checkpoint says had
trained (``clients/round.py``): the client fails the round with a message that starts with
``REFUSED``, and the server stops the run with it (``flows/federated.py``).

The store: ``<root>/<run>/`` holds 16 SQLite files (``states-NN.sqlite``, partition mod 16), a row
per (partition, round) with the records serialised as a checkpoint is — not a file per client
and round, so a population of 10^5 virtual clients is 16 files however many of them trained.
SQLite is in Python's standard library, writes a row whole or not at all (a kill or a full disk
mid-write leaves the previous rounds intact), and lets the processes of one machine (a host's
SuperNodes, Ray's actors) write at once under its own locking; the shards let writers of
different partitions go at once (one file has one writer at a time) and keep each file small.
A run's folder is its state: removing it forgets every client's.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.checkpoints import (
    CheckpointWriteError,
    ResumeError,
    checkpoint_bytes,
    config_fingerprint,
    read_checkpoint_bytes,
)
from lifelong.config import Config
from lifelong.env import state_dir

#: Where a node keeps its state: node config key (protocol.NODE_STATE_DIR), then environment variable.
ENV_VAR = "LIFELONG_CLIENT_STATE_DIR"
#: How a client's refusal starts, so that the server recognises it in an error reply.
REFUSED = "refused client state"
VERSION = 1
SHARDS = 16
_SCHEMA = """CREATE TABLE IF NOT EXISTS states (
    partition INTEGER NOT NULL, round INTEGER NOT NULL, records BLOB NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, round)) WITHOUT ROWID"""


def state_root(node_config: dict | None = None) -> Path:
    configured = (node_config or {}).get(protocol.NODE_STATE_DIR) or os.environ.get(ENV_VAR)
    return Path(str(configured)).resolve() if configured else state_dir() / "client-state"


@dataclass(frozen=True)
class Slot:
    """Where one client's state of one run is kept: its partition's rows in the run's store."""

    run_dir: Path
    partition: int

    @property
    def shard(self) -> Path:
        return self.run_dir / f"states-{self.partition % SHARDS:02d}.sqlite"

    def __str__(self) -> str:
        return f"{self.shard} (partition {self.partition})"


def client_slot(root: Path, run: str, partition_id: int) -> Slot:
    if not run or "/" in run or run.startswith("."):
        raise ValueError(f"run key {run!r} is not a plain name")
    return Slot(root / run, int(partition_id))


#: Set on every machine whose client-state folder is shared with other machines (a Ray cluster
#: resuming from shared storage): SQLite's write-ahead log needs one host, so the shards then use
#: its rollback journal instead (about 1 ms more a save; it needs a filesystem with working locks).
SHARED_ENV_VAR = "LIFELONG_CLIENT_STATE_SHARED"

#: Open connections of this process, by shard, the most recently used last: opening one per round
#: and closing it cost more than the write (closing the last connection folds SQLite's write-ahead
#: log back into the file). At most one run's worth stay open (each holds three files). Each is
#: kept with its file's identity, so a shard deleted and made again is opened again.
_OPEN: OrderedDict[Path, tuple[tuple[int, int], sqlite3.Connection]] = OrderedDict()
_LOCK = threading.Lock()
# A forked child must not use (or close) its parent's connections: it opens its own.
os.register_at_fork(after_in_child=_OPEN.clear)


def _connect(shard: Path, create: bool) -> sqlite3.Connection | None:
    with _LOCK:
        try:
            st = shard.stat()
            identity = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            identity = None
        if shard in _OPEN:
            if _OPEN[shard][0] == identity:
                _OPEN.move_to_end(shard)
                return _OPEN[shard][1]
            _OPEN.pop(shard)[1].close()  # the run's folder was removed (and maybe made again)
        if not create and identity is None:
            return None
        shard.parent.mkdir(parents=True, exist_ok=True)
        # One connection per shard per process, used by whichever thread runs a client's round.
        db = sqlite3.connect(shard, timeout=60.0, check_same_thread=False)
        shared = os.environ.get(SHARED_ENV_VAR, "") not in ("", "0")
        db.execute(f"PRAGMA journal_mode={'DELETE' if shared else 'WAL'}")  # WAL: readers do not wait for a writer
        # A process that dies loses no committed row; a power cut may lose the last rounds of a
        # WAL (the server's checkpoint then names a round the client no longer has: refused).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        _add_attempt_column(db)
        st = shard.stat()
        _OPEN[shard] = ((st.st_dev, st.st_ino), db)
        while len(_OPEN) > SHARDS:
            _OPEN.popitem(last=False)[1][1].close()
        return db


def _add_attempt_column(db: sqlite3.Connection) -> None:
    """A shard written before rows recorded their attempt: its rows are the first attempt's."""
    if "attempt" not in {c[1] for c in db.execute("PRAGMA table_info(states)")}:
        try:
            db.execute("ALTER TABLE states ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:  # another process added it meanwhile
            if "duplicate column" not in str(exc):
                raise


def saved_rounds(slot: Slot) -> list[int]:
    """The rounds whose state ``slot`` holds, oldest first."""
    db = _connect(slot.shard, create=False)
    if db is None:
        return []
    return [r for (r,) in db.execute("SELECT round FROM states WHERE partition = ? ORDER BY round", (slot.partition,))]


def saved_partitions(run_dir: Path) -> set[int]:
    """The partitions whose state the run's store in ``run_dir`` holds."""
    out: set[int] = set()
    for shard in sorted(run_dir.glob("states-*.sqlite")):
        db = _connect(shard, create=False)
        if db is not None:  # (removed meanwhile)
            out.update(p for (p,) in db.execute("SELECT DISTINCT partition FROM states"))
    return out


def forget(slot: Slot) -> None:
    """Remove every state ``slot`` holds (the client starts over)."""
    db = _connect(slot.shard, create=False)
    if db is not None:
        with db:
            db.execute("DELETE FROM states WHERE partition = ?", (slot.partition,))


def records(state: RecordDict) -> dict:
    """A ``RecordDict`` of array and config records as plain tensors and values."""
    out = {}
    for key in state.keys():
        rec = state[key]
        if isinstance(rec, ArrayRecord):
            out[key] = ("arrays", dict(to_state_dict(rec)))
        elif isinstance(rec, ConfigRecord):
            out[key] = ("config", dict(rec))
        else:
            raise TypeError(f"client state record {key!r} of type {type(rec).__name__} cannot be saved")
    return out


def record_dict(saved: dict) -> RecordDict:
    return RecordDict({k: from_state_dict(v) if kind == "arrays" else ConfigRecord(v) for k, (kind, v) in saved.items()})


def save(state: RecordDict, cfg: Config, slot: Slot, rnd: int, checkpointed: int, attempt: int = 0) -> None:
    """Write the state after round ``rnd`` of the run's ``attempt``; keep only what a resume from
    ``checkpointed`` or later needs. In one transaction: a failed write (a full disk) leaves the
    rounds saved before."""
    data = checkpoint_bytes({"version": VERSION, "config": config_fingerprint(cfg), "round": rnd,
                             "records": records(state)})
    try:
        db = _connect(slot.shard, create=True)
        with db:
            db.execute("INSERT OR REPLACE INTO states (partition, round, records, attempt) VALUES (?, ?, ?, ?)",
                       (slot.partition, rnd, data, attempt))
            # The newest round at or below the server's checkpoint, and every later one, stay.
            db.execute("DELETE FROM states WHERE partition = ? AND round < (SELECT MAX(round) FROM states "
                       "WHERE partition = ? AND round <= ?)", (slot.partition, slot.partition, checkpointed))
    except (sqlite3.DatabaseError, OSError) as exc:  # (a corrupt shard: "file is not a database")
        # SQLite names no OS error: a write it could not make is SQLITE_FULL or SQLITE_IOERR_WRITE.
        name = getattr(exc, "sqlite_errorname", "")
        full = name.startswith(("SQLITE_FULL", "SQLITE_IOERR")) or getattr(exc, "errno", None) in (
            errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise CheckpointWriteError(f"could not write the state of {slot}: {exc}"
                                   + (f" ({name}: is the disk or the file-size limit full?)" if full else "")
                                   + "; the rounds saved before are intact") from exc


def restore(state: RecordDict, cfg: Config, slot: Slot, upto: int, resume_rounds: Sequence[int] = ()) -> int | None:
    """Load into ``state`` the newest state at or below round ``upto`` that the run's current
    attempt can go on from (``resume_rounds``: the round each resume went on from, oldest first;
    see the module's docstring); the round it is from, or None when there is none. Raises
    ``ResumeError`` (starting with ``REFUSED``, naming the store) for a corrupt state or one of
    another config."""
    attempt = len(resume_rounds)
    try:
        db = _connect(slot.shard, create=False)
        if db is None:
            return None
        with db:  # rows this attempt cannot go on from: the rounds it trains (again)
            db.execute("DELETE FROM states WHERE partition = ? AND (round > ? OR attempt > ?)",
                       (slot.partition, upto, attempt))
            for earlier in range(attempt):  # after the round the next attempt resumed from: redone since
                db.execute("DELETE FROM states WHERE partition = ? AND attempt = ? AND round > ?",
                           (slot.partition, earlier, min(resume_rounds[earlier:])))
        row = db.execute("SELECT round, records FROM states WHERE partition = ? ORDER BY round DESC LIMIT 1",
                         (slot.partition,)).fetchone()
    except sqlite3.DatabaseError as exc:  # not a database, a corrupt page
        raise ResumeError(f"{REFUSED}: {slot} cannot be read ({exc}); remove the run's client-state folder "
                          f"({slot.run_dir}) to restart its clients without their state") from None
    if row is None:
        return None
    rnd, data = row
    where = f"the state of round {rnd} in {slot}"
    try:
        saved = read_checkpoint_bytes(data, where, cfg, VERSION, "Lifelong client state",
                                      f"; remove the run's client-state folder ({slot.run_dir}) to restart its clients "
                                      "without their state")
        loaded = record_dict(saved["records"])
    except ResumeError as exc:
        raise ResumeError(f"{REFUSED}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{REFUSED}: {where} holds no client records ({exc})") from None
    for key in list(loaded.keys()):
        state[key] = loaded[key]
    return rnd
