"""A client's state on its own disk: what is kept after each round, what a resume loads, what is refused,
and the store that holds it (SQLite shards: rows, not a file per client and round)."""

import pytest
import torch
from flwr.app import RecordDict

from lifelong.bridges.flower.protocol import NODE_STATE_DIR
from lifelong.checkpoints import ResumeError
from lifelong.clients import state as st
from lifelong.clients import state_store as ss
from lifelong.config import load_config


@pytest.fixture
def cfg():
    return load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2"])


def client_state(trained: int) -> RecordDict:
    state = RecordDict()
    st.write_progress(state, trained, trained - 1)
    st.write_tensors(state, st.REPLAY, {"0/x": torch.full((2, 3), float(trained))})
    return state


def test_each_round_is_saved_and_only_the_newest_checkpointed_one_is_kept(tmp_path, cfg):
    d = ss.client_slot(tmp_path, "run1", 0)
    ss.save(client_state(1), cfg, d, rnd=1, checkpointed=0)
    assert ss.saved_rounds(d) == [1]
    ss.save(client_state(2), cfg, d, rnd=2, checkpointed=1)
    assert ss.saved_rounds(d) == [1, 2]  # the server may die before its checkpoint of round 2
    ss.save(client_state(4), cfg, d, rnd=4, checkpointed=3)  # not sampled in round 3
    assert ss.saved_rounds(d) == [2, 4]  # round 2's is the newest at or below round 3
    ss.save(client_state(5), cfg, d, rnd=5, checkpointed=4)
    assert ss.saved_rounds(d) == [4, 5]


def test_a_resume_loads_the_newest_state_at_or_below_the_servers_round(tmp_path, cfg):
    d = ss.client_slot(tmp_path, "run1", 1)
    for r in (2, 4, 5):
        ss.save(client_state(r), cfg, d, rnd=r, checkpointed=0)
    state = RecordDict()
    assert ss.restore(state, cfg, d, upto=4) == 4
    assert st.read_progress(state) == {"trained": 4, "consolidated": 3}
    assert torch.equal(st.read_tensors(state, st.REPLAY)["0/x"], torch.full((2, 3), 4.0))
    assert ss.saved_rounds(d) == [2, 4]  # round 5 is trained again by the resumed run
    assert ss.restore(RecordDict(), cfg, d, upto=1) is None  # it had not trained by round 1
    assert ss.restore(RecordDict(), cfg, ss.client_slot(tmp_path, "run1", 7), upto=9) is None


def test_a_node_back_in_a_resumed_run_loads_what_this_attempt_saved_not_the_stale_rounds(tmp_path, cfg):
    """Attempt 0 saved rounds 2 and 5 and died after its checkpoint of round 4 (its round 5 is
    redone). Attempt 1 went on from round 4; the client trained in its rounds 6 and 7, then its
    SuperNode died and came back: in round 9 it loads round 7, this attempt's, not the resume round's."""
    d = ss.client_slot(tmp_path, "run1", 3)
    for r in (2, 5):
        ss.save(client_state(r), cfg, d, rnd=r, checkpointed=1, attempt=0)
    state = RecordDict()
    assert ss.restore(state, cfg, d, upto=5, resume_rounds=[4]) == 2  # its first message, round 6
    assert ss.saved_rounds(d) == [2]  # round 5 of the dead attempt: gone
    for r in (6, 7):
        ss.save(client_state(r), cfg, d, rnd=r, checkpointed=5, attempt=1)
    state = RecordDict()
    assert ss.restore(state, cfg, d, upto=8, resume_rounds=[4]) == 7
    assert st.read_progress(state)["trained"] == 7


def test_rows_of_an_attempt_that_died_before_its_first_checkpoint_are_never_loaded(tmp_path, cfg):
    """Attempt 1 went on from round 4 and died before checkpointing; the client had saved its
    round 5 and 6 there. Attempt 2 also goes on from round 4 (the checkpoint did not move): a
    client first asked in round 8 must load round 3, not attempt 1's round 6; nor may a row of an
    attempt later than the current one be used."""
    d = ss.client_slot(tmp_path, "run1", 4)
    ss.save(client_state(3), cfg, d, rnd=3, checkpointed=2, attempt=0)
    for r in (5, 6):
        ss.save(client_state(r), cfg, d, rnd=r, checkpointed=4, attempt=1)
    assert ss.restore(RecordDict(), cfg, d, upto=7, resume_rounds=[4, 4]) == 3
    assert ss.saved_rounds(d) == [3]
    ss.save(client_state(5), cfg, d, rnd=5, checkpointed=4, attempt=3)
    assert ss.restore(RecordDict(), cfg, d, upto=7, resume_rounds=[4, 4]) == 3


def test_a_store_written_before_rows_had_attempts_reads_as_the_first_attempts(tmp_path, cfg):
    import sqlite3

    d = ss.client_slot(tmp_path, "old", 0)
    d.run_dir.mkdir()
    data = None
    ss.save(client_state(2), cfg, ss.client_slot(tmp_path, "new", 0), rnd=2, checkpointed=1)
    with sqlite3.connect(ss.client_slot(tmp_path, "new", 0).shard) as db:
        (data,) = db.execute("SELECT records FROM states").fetchone()
    with sqlite3.connect(d.shard) as db:  # the schema before: no attempt column
        db.execute("CREATE TABLE states (partition INTEGER NOT NULL, round INTEGER NOT NULL, records BLOB NOT NULL, "
                   "PRIMARY KEY (partition, round)) WITHOUT ROWID")
        db.executemany("INSERT INTO states VALUES (0, ?, ?)", [(2, data), (5, data)])
    assert ss.restore(RecordDict(), cfg, d, upto=6, resume_rounds=[4]) == 2  # round 5 was after the resume
    ss.save(client_state(6), cfg, d, rnd=6, checkpointed=4, attempt=1)
    assert ss.saved_rounds(d) == [2, 6]


def test_a_corrupt_state_is_refused_naming_the_store(tmp_path, cfg):
    import sqlite3

    d = ss.client_slot(tmp_path, "run1", 0)
    ss.save(client_state(3), cfg, d, rnd=3, checkpointed=2)
    with sqlite3.connect(d.shard) as db:
        db.execute("UPDATE states SET records = ? WHERE partition = 0", (b"half a file",))
    with pytest.raises(ResumeError, match=rf"^{ss.REFUSED}: the state of round 3 in {d.shard} \(partition 0\) is unreadable"):
        ss.restore(RecordDict(), cfg, d, upto=3)


def test_a_population_of_clients_is_sixteen_files_and_clients_keep_apart(tmp_path, cfg):
    for pid in range(40):
        ss.save(client_state(pid + 1), cfg, ss.client_slot(tmp_path, "run1", pid), rnd=1, checkpointed=0)
    assert sorted(p.name for p in (tmp_path / "run1").glob("*.sqlite")) == [f"states-{i:02d}.sqlite" for i in range(16)]
    state = RecordDict()
    assert ss.restore(state, cfg, ss.client_slot(tmp_path, "run1", 17), upto=1) == 1
    assert st.read_progress(state)["trained"] == 18  # partition 17's own (its shard also holds 1 and 33)
    ss.forget(ss.client_slot(tmp_path, "run1", 1))
    assert ss.saved_rounds(ss.client_slot(tmp_path, "run1", 1)) == []
    assert ss.saved_rounds(ss.client_slot(tmp_path, "run1", 33)) == [1]


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import torch
from flwr.app import RecordDict
from lifelong.checkpoints import CheckpointWriteError
from lifelong.clients import state as st, state_store as ss
from lifelong.config import load_config

cfg = load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2"])
slot = ss.client_slot(Path(sys.argv[1]), "run1", 0)
def state(n):
    s = RecordDict()
    st.write_tensors(s, st.REPLAY, {"x": torch.zeros(n)})
    return s
ss.save(state(10), cfg, slot, rnd=1, checkpointed=0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    ss.save(state(200_000), cfg, slot, rnd=2, checkpointed=1)
except CheckpointWriteError as exc:
    print("REFUSED", exc)
print("ROUNDS", ss.saved_rounds(slot))
"""


def test_a_full_disk_fails_the_write_and_keeps_the_rounds_saved_before(tmp_path):
    """A real failed write: the kernel refuses to grow the shard past the process's file-size
    limit (EFBIG, what a full disk's ENOSPC does), in a child process so that it binds it alone."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["REFUSED"].startswith(f"could not write the state of {tmp_path / 'run1' / 'states-00.sqlite'} (partition 0): ")
    assert lines["REFUSED"].endswith("; the rounds saved before are intact")
    assert lines["ROUNDS"] == "[1]"


def test_a_state_file_of_another_config_is_refused(tmp_path, cfg):
    d = ss.client_slot(tmp_path, "run1", 0)
    ss.save(client_state(3), cfg, d, rnd=3, checkpointed=2)
    other = load_config(None, ['flow="federated"', 'model.name="mlp"', "federated.clients=2", "training.lr=0.5"])
    with pytest.raises(ResumeError, match=r"different config \(differs in: training.lr\)"):
        ss.restore(RecordDict(), other, d, upto=3)


def test_the_state_root_is_the_nodes_then_the_environments_then_next_to_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    assert ss.state_root({}) == tmp_path / "home" / "client-state"
    monkeypatch.setenv(ss.ENV_VAR, str(tmp_path / "env"))
    assert ss.state_root({"partition-id": 0}) == tmp_path / "env"
    assert ss.state_root({NODE_STATE_DIR: str(tmp_path / "node")}) == tmp_path / "node"
    with pytest.raises(ValueError, match="not a plain name"):
        ss.client_slot(tmp_path, "../elsewhere", 0)


def test_a_shard_that_is_no_database_is_refused_and_a_removed_run_folder_starts_again(tmp_path, cfg):
    import shutil

    from lifelong.checkpoints import CheckpointWriteError

    d = ss.client_slot(tmp_path, "run1", 0)
    ss.save(client_state(1), cfg, d, rnd=1, checkpointed=0)
    shutil.rmtree(tmp_path / "run1")  # with this process's connection to its shard still open
    ss.save(client_state(2), cfg, d, rnd=2, checkpointed=1)
    assert ss.saved_rounds(d) == [2] and d.shard.exists()  # written to the new file, not the deleted one
    bad = ss.client_slot(tmp_path, "run2", 3)
    bad.shard.parent.mkdir()
    bad.shard.write_bytes(b"not a database" * 300)
    with pytest.raises(ResumeError, match=rf"^{ss.REFUSED}: {bad.shard} \(partition 3\) cannot be read"):
        ss.restore(RecordDict(), cfg, bad, upto=5)
    with pytest.raises(CheckpointWriteError, match=rf"could not write the state of {bad.shard} \(partition 3\)"):
        ss.save(client_state(1), cfg, bad, rnd=1, checkpointed=0)


def test_a_folder_shared_between_machines_uses_the_rollback_journal(tmp_path, cfg, monkeypatch):
    import sqlite3

    monkeypatch.setenv(ss.SHARED_ENV_VAR, "1")  # WAL's shared memory needs one host
    d = ss.client_slot(tmp_path, "shared", 0)
    ss.save(client_state(1), cfg, d, rnd=1, checkpointed=0)
    with sqlite3.connect(d.shard) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    monkeypatch.delenv(ss.SHARED_ENV_VAR)
    local = ss.client_slot(tmp_path, "local", 0)
    ss.save(client_state(1), cfg, local, rnd=1, checkpointed=0)
    with sqlite3.connect(local.shard) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
