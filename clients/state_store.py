"""A federated client's state on the client's own disk, after every successful round.

Flower keeps a client's ``Context.state`` (``clients/state.py``) for one Flower run, in the process
that runs the client: our in-process grid, the Ray engine, a SuperNode — possibly on another
machine. A resumed run is a new Flower run (fresh, empty contexts), so each client persists its
own records, and the server, which cannot reach them, only says which round they must match:

* every train message of a checkpointed run carries the run key (``protocol.STATE_RUN``, the MLflow run id)
  and the last round the server has durably checkpointed (``protocol.SAVED_ROUND``);
* after a successful round r the client (one whose learner keeps state: ``ClientLearner.keeps_state``;
  a plain fine-tuner reads nothing back) writes its records to
  ``<root>/<run>/<partition-id>/round-<r>.pt`` (atomically) and deletes its files older than the
  newest one at or below the server's checkpointed round — at most one file more than needed:
  the server may die after the client's round r and before its own checkpoint of r;
* a resumed run's messages also carry ``protocol.RESUME_ROUND``; a client whose ``Context.state`` is
  empty (every client of the new Flower run, until it trains) loads its newest file at or below
  that round — or starts empty if it had not trained by then — and deletes the newer ones, which
  the resumed run redoes;
* a client whose ``Context.state`` is empty in the middle of a run that is not resumed — its
  SuperNode died and a new one came back with the same partition — loads its newest file from
  before the current round, and goes on from the memory it had when it died.

``<root>``: the node config's ``client-state-dir``
(``flower-supernode --node-config "partition-id=0 num-partitions=2 client-state-dir='/data/lifelong'"``),
else ``$LIFELONG_CLIENT_STATE_DIR``, else ``<LIFELONG_HOME>/client-state``, next to the server's
``checkpoints/``. A file that is corrupt or was written by another config is refused, never
silently used, and so is a missing state of a client the resumed run's checkpoint says had
trained (``clients/round.py``): the client fails the round with a message that starts with
``REFUSED``, and the server stops the run with it (``flows/federated.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.checkpoints import ResumeError, config_fingerprint, read_checkpoint, write_checkpoint
from lifelong.config import Config
from lifelong.env import state_dir

#: Where a node keeps its state: node config key (protocol.NODE_STATE_DIR), then environment variable.
ENV_VAR = "LIFELONG_CLIENT_STATE_DIR"
#: How a client's refusal starts, so that the server recognises it in an error reply.
REFUSED = "refused client state"
VERSION = 1
_FILE = re.compile(r"round-(\d+)\.pt")


def state_root(node_config: dict | None = None) -> Path:
    configured = (node_config or {}).get(protocol.NODE_STATE_DIR) or os.environ.get(ENV_VAR)
    return Path(str(configured)).resolve() if configured else state_dir() / "client-state"


def client_dir(root: Path, run: str, partition_id: int) -> Path:
    if not run or "/" in run or run.startswith("."):
        raise ValueError(f"run key {run!r} is not a plain name")
    return root / run / str(partition_id)


def saved_rounds(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir() if (m := _FILE.fullmatch(p.name))}


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


def save(state: RecordDict, cfg: Config, directory: Path, rnd: int, checkpointed: int) -> Path:
    """Write the state after round ``rnd``; keep only what a resume from ``checkpointed`` or later needs."""
    path = directory / f"round-{rnd}.pt"
    write_checkpoint({"version": VERSION, "config": config_fingerprint(cfg), "round": rnd,
                      "records": records(state)}, path)
    rounds = saved_rounds(directory)
    keep = max((r for r in rounds if r <= checkpointed), default=None)
    for r, p in rounds.items():
        if keep is not None and r < keep:
            p.unlink(missing_ok=True)
    return path


def restore(state: RecordDict, cfg: Config, directory: Path, resume_round: int) -> int | None:
    """Load the newest state at or below ``resume_round`` into ``state``; the round it is from,
    or None when the client had not trained by then. Raises ``ResumeError`` (starting with
    ``REFUSED``, naming the file) for a corrupt file or one of another config."""
    rounds = saved_rounds(directory)
    for r, p in rounds.items():
        if r > resume_round:  # after the server's checkpoint: the resumed run trains it again
            p.unlink(missing_ok=True)
    below = [r for r in rounds if r <= resume_round]
    if not below:
        return None
    rnd = max(below)
    try:
        saved = read_checkpoint(rounds[rnd], cfg, VERSION, "Lifelong client state",
                                "; delete the client's state folder to restart the run without it")
        loaded = record_dict(saved["records"])
    except ResumeError as exc:
        raise ResumeError(f"{REFUSED}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{REFUSED}: {rounds[rnd]} holds no client records ({exc})") from None
    for key in list(loaded.keys()):
        state[key] = loaded[key]
    return rnd
