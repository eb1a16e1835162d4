"""A client's own record of the user-level DP rounds it took part in, kept on the client's side.

The server's ledger (``privacy/ledger.py``) accounts every client from the replies it aggregated,
and carries over from run to run when a run names the earlier one (``privacy.ledger_from``). A
new run that does not name it would start every client at zero. The client itself is the one
whose privacy is spent, so it keeps its own record, on its own disk, beside its saved state
(``clients/state_store.py``), and it outlives any run:

* every train message of a run that asks for it (``protocol.LEDGER_RUNS``: the runs the server's
  ledger already holds, this run first) carries the accounted noise multiplier of the round
  (``protocol.DP_ACCOUNTED_Z``);
* the client records the round when it replies — when it *sends* an update, before it knows
  whether the server used it, so its record is an upper bound of the server's;
* and replies with the noise multipliers of the rounds it recorded in runs the server's ledger
  does not hold (``protocol.PRIOR_DP_ROUNDS``). The server charges those before it decides
  whether this round's update fits the client's budget (``bridges/flower/dp_fedavg.py``), so a
  new run cannot reset a budget the clients have spent.

Which client: a SuperNode serves one partition of one population, and the record is keyed by a
fingerprint of what makes that population (the stream, the partitioning, the number of clients,
the seed) and the partition id, so partition 3 of one dataset is not partition 3 of another.

The store: one SQLite file, ``<client-state root>/privacy_record.sqlite``. SQLite is in Python's
standard library, is transactional (a record is written whole or not at all; a full disk raises
and the round fails, recorded nothing), and several processes of one machine (a host's
SuperNodes, Ray's actors) may write it at once under its own locking; rows, not a file per
client, so a population of 10^5 virtual clients is one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from lifelong.config import Config

FILE = "privacy_record.sqlite"
_SCHEMA = """CREATE TABLE IF NOT EXISTS rounds (
    population TEXT NOT NULL, client INTEGER NOT NULL, run TEXT NOT NULL, round INTEGER NOT NULL,
    experience INTEGER NOT NULL, noise_multiplier REAL NOT NULL,
    PRIMARY KEY (population, client, run, round))"""


def population_key(cfg: Config) -> str:
    """Who the clients of ``cfg`` are: the stream they hold, how it is split, into how many, with
    which seed (a rerun of the same split is the same population; another split is another)."""
    f = cfg.federated
    who = {"stream": cfg.stream.model_dump(mode="json"), "partition": f.partition, "alpha": f.alpha,
           "shards_per_client": f.shards_per_client, "clients": f.clients, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(who, sort_keys=True).encode()).hexdigest()[:16]


def _connect(root: Path) -> sqlite3.Connection:
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / FILE, timeout=60.0)  # (other processes of the host may be writing)
    db.execute(_SCHEMA)
    return db


def record(root: Path, population: str, client: int, run: str, rnd: int, experience: int,
           noise_multiplier: float) -> None:
    """Record that ``client`` sent an update in round ``rnd`` of ``run`` (once: a retried round
    is the same round)."""
    db = _connect(root)
    try:
        with db:
            db.execute("INSERT OR IGNORE INTO rounds VALUES (?, ?, ?, ?, ?, ?)",
                       (population, client, run, rnd, experience, float(noise_multiplier)))
    finally:
        db.close()


def prior_rounds(root: Path, population: str, client: int, known_runs: Iterable[str]) -> list[float]:
    """The noise multipliers of the rounds ``client`` recorded in runs other than ``known_runs``,
    in the order they were recorded."""
    if not (root / FILE).exists():
        return []
    known = sorted(set(known_runs))
    db = _connect(root)
    try:
        rows = db.execute(f"SELECT noise_multiplier FROM rounds WHERE population = ? AND client = ? AND run NOT IN "
                          f"({', '.join('?' * len(known))}) ORDER BY rowid", (population, client, *known))
        return [float(z) for (z,) in rows]
    finally:
        db.close()
