"""A run's checkpoints, and going on from them: a continual strategy's after every experience,
a federated run's after every round. The file format (atomic write, checked read) is
``lifelong/checkpoints.py``'s; what a learner holds, ``bridges/avalanche/checkpoint.py``'s.

A continual strategy's: its learner's state (model, optimizer, clock, RNG, regularisers, replay
memory, plugins that checkpoint themselves), the accuracy-matrix rows and the evaluation trace, and
the next experience to train.

A federated run's: everything the next round depends on: the global model, the model the previous experience ended
with (``boundary``), the strategy's records (client outcomes, skipped rounds, which node holds
which partition), the evaluation trace and the accuracy-matrix rows, and the server's own state
(``server_state()`` of the strategy): the server optimizer's moments and, with user-level DP, the
(adaptive) clipping bound and the noise generator; and the metric values the server has not yet
sent to MLflow (it sends them in batches), which a resumed run sends. Not the clients' state: every client saves its
own after each round, on its side, on every backend (``clients/state_store.py``), and a resumed
run's clients load theirs back. No RNG state: client sampling and every client's training are
seeded per round, so round r+1 after a resume draws what it would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lifelong.bridges.avalanche.checkpoint import NotCheckpointable, learner_state
from lifelong.checkpoints import (
    ResumeError,
    checkpoint_dir,
    config_fingerprint,
    read_checkpoint,
    write_checkpoint,
)
from lifelong.config import Config

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from lifelong.flows.continual import Learner

# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_VERSION = 2  # 2: plugins that checkpoint themselves (OnePrompt, GCond arbitration)


def checkpoint_path(parent_run_id: str, index: int) -> Path:
    return checkpoint_dir(parent_run_id) / f"strategy{index}.pt"


def save_checkpoint(learner: Learner, experience: int, path: Path) -> None:
    """After experience ``experience`` (trained and evaluated): everything to go on from the next."""
    try:
        state = learner_state(learner.strategy)
    except NotCheckpointable:
        return  # said once, when the learner was built
    state.update({"version": CHECKPOINT_VERSION, "config": config_fingerprint(learner.cfg),
                  "run_id": learner.run_id, "label": learner.label, "next_experience": experience + 1,
                  "rows": learner.rows, "trace": [(p.iteration, p.experience, p.accuracies)
                                                  for p in learner.trace.points]})
    write_checkpoint(state, path)


def load_checkpoint(cfg: Config, path: Path) -> dict:
    return read_checkpoint(path, cfg, CHECKPOINT_VERSION, "Lifelong",
                           "; delete it to restart that strategy from its first experience")



# --------------------------------------------------------------------------- federated rounds


FEDERATED_VERSION = 3  # 2: the clients' state is theirs (clients/state_store.py); 3: the server's state


def checkpoint_file(run_id: str) -> Path:
    return checkpoint_dir(run_id) / "federated.pt"


def save_round(path: Path, cfg: Config, run_id: str, rnd: int, arrays: ArrayRecord, strategy, trace,
               rows, pending: list | None = None, client_rows: list | None = None,
               resume_rounds: list[int] | None = None) -> None:
    """``pending``: metric values not yet sent to MLflow (``MLflowLogger.pending``); ``client_rows``:
    the per-client accuracy rows so far (clients × experiences arrays); ``resume_rounds``: the round
    each resume of the run went on from (``begin_attempt``)."""
    from lifelong.bridges.flower.records import to_state_dict  # Flower's import only for federated runs

    state = {
        "version": FEDERATED_VERSION, "config": config_fingerprint(cfg), "run_id": run_id, "round": rnd,
        "arrays": dict(to_state_dict(arrays)),
        "boundary": dict(to_state_dict(strategy.boundary)) if strategy.boundary is not None else None,
        "outcomes": [vars(o) for o in strategy.outcomes], "skipped": list(strategy.skipped_rounds),
        "partition_of": dict(strategy._partition_of),
        "server": strategy.server_state(),
        "trace": [(p.iteration, p.experience, p.accuracies) for p in trace.points],
        "rows": [list(r) for r in rows],
        # Arrays, not lists: a population's rows are 10^5 clients long, and pickling a list of
        # floats per round cost seconds at that size.
        "client_rows": [np.asarray(r, dtype=float) for r in client_rows or []],
        "pending": list(pending or []),
        "resume_rounds": list(resume_rounds or []),
    }
    write_checkpoint(state, path)


def begin_attempt(path: Path, state: dict) -> list[int]:
    """A resume of the run whose checkpoint ``state`` (loaded from ``path``) is: the round every
    resume went on from, this one's last, written back at once. Its length numbers the attempt,
    which each client row records (``clients/state_store.py``): a row an earlier attempt saved
    after the round the next one resumed from was trained again since, and is never loaded —
    even by an attempt that itself died before its first checkpoint."""
    rounds = [*state.get("resume_rounds", []), int(state["round"])]
    write_checkpoint({**state, "resume_rounds": rounds}, path)
    return rounds


def load_round(path: Path, cfg: Config) -> dict:
    if not path.exists():
        raise ResumeError(f"no checkpoint at {path}: the run stopped before its first round ended, "
                          "or it ran where this machine's checkpoints are not (a deployment's ServerApp "
                          "keeps them under its own LIFELONG_HOME)")
    return read_checkpoint(path, cfg, FEDERATED_VERSION, "Lifelong federated")


def restore_server(state: dict, strategy, trace, rows, rounds_per_experience: int,
                   consolidates: bool, client_rows: list | None = None) -> tuple[ArrayRecord, int]:
    """Load a checkpoint into the strategy, trace, rows and per-client rows; returns the global
    model and the number of rounds done."""
    from lifelong.bridges.flower.fedavg import ClientOutcome
    from lifelong.bridges.flower.records import from_state_dict

    # The records live on the FedAvg strategy, also when a DP wrapper reads them through to it.
    base = getattr(strategy, "inner", strategy)
    base.outcomes = [ClientOutcome(**o) for o in state["outcomes"]]
    base.skipped_rounds = list(state["skipped"])
    base._partition_of = dict(state["partition_of"])
    base._all_connected = True
    strategy.load_server_state(state["server"])
    arrays = from_state_dict(state["arrays"])
    strategy.boundary = from_state_dict(state["boundary"]) if state["boundary"] is not None else None
    if consolidates and state["round"] % rounds_per_experience == 0:
        # Saved at an experience's last round, before the server set it as the boundary.
        strategy.boundary = arrays
    rows.extend(state["rows"])
    if client_rows is not None:  # (a checkpoint from before per-client evaluation has none)
        client_rows.extend(np.array(r, dtype=float) for r in state.get("client_rows", []))
    for it, exp, accs in state["trace"]:
        trace.add(it, exp, accs)
    return arrays, int(state["round"])
