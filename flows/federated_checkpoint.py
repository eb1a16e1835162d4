"""A federated run's checkpoint after every round, and going on from it.

Everything the next round depends on: the global model, the model the previous experience ended
with (``boundary``), the strategy's records (client outcomes, skipped rounds, which node holds
which partition), the evaluation trace and the accuracy-matrix rows — and every client's
``Context.state``, which only the in-process backend can reach (Flower's Ray engine and real
SuperNodes keep theirs) — and the server's own state (``server_state()`` of the strategy): the
server optimizer's moments and, with user-level DP, the (adaptive) clipping bound and the noise
generator. Client sampling and every client's training are seeded per round, so round r+1 after a
resume draws what it would have drawn.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flows.checkpoints import ResumeError, checkpoint_dir, config_fingerprint, read_checkpoint, write_checkpoint
from lifelong.config import Config
from strategies.fedavg import ClientOutcome

VERSION = 2  # 2: the server's state (optimizer moments, DP bound and noise generator)


def checkpoint_file(run_id: str) -> Path:
    return checkpoint_dir(run_id) / "federated.pt"


def _records(state: RecordDict) -> dict:
    out = {}
    for key in state.keys():
        rec = state[key]
        if isinstance(rec, ArrayRecord):
            out[key] = ("arrays", dict(rec.to_torch_state_dict()))
        elif isinstance(rec, ConfigRecord):
            out[key] = ("config", dict(rec))
        else:
            raise ResumeError(f"client state record {key!r} of type {type(rec).__name__} "
                                       "cannot be checkpointed")
    return out


def _record_dict(saved: dict) -> RecordDict:
    return RecordDict({k: ArrayRecord(v) if kind == "arrays" else ConfigRecord(v) for k, (kind, v) in saved.items()})


def save_round(path: Path, cfg: Config, run_id: str, rnd: int, arrays: ArrayRecord, strategy, trace, rows,
               grid) -> None:
    contexts = getattr(grid, "contexts", None)
    if contexts is None:
        return  # Ray / a deployment: the clients' state is not ours to save
    state = {
        "version": VERSION, "config": config_fingerprint(cfg), "run_id": run_id, "round": rnd,
        "arrays": dict(arrays.to_torch_state_dict()),
        "boundary": dict(strategy.boundary.to_torch_state_dict()) if strategy.boundary is not None else None,
        "outcomes": [vars(o) for o in strategy.outcomes], "skipped": list(strategy.skipped_rounds),
        "partition_of": dict(strategy._partition_of),
        "server": strategy.server_state(),
        "trace": [(p.iteration, p.experience, p.accuracies) for p in trace.points],
        "rows": [list(r) for r in rows],
        "clients": {node: _records(ctx.state) for node, ctx in contexts.items()},
    }
    write_checkpoint(state, path)


def load_round(path: Path, cfg: Config) -> dict:
    if not path.exists():
        raise ResumeError(f"no checkpoint at {path}: the run was not simulated in-process, or "
                                   "it stopped before its first round ended")
    return read_checkpoint(path, cfg, VERSION, "Lifelong federated")


def restore_server(state: dict, strategy, trace, rows, grid, rounds_per_experience: int,
                   consolidates: bool) -> tuple[ArrayRecord, int]:
    """Load a checkpoint into the strategy, trace, rows and the in-process grid's clients;
    returns the global model and the number of rounds done."""
    from flwr.app import Context

    # The records live on the FedAvg strategy, also when a DP wrapper reads them through to it.
    base = getattr(strategy, "inner", strategy)
    base.outcomes = [ClientOutcome(**o) for o in state["outcomes"]]
    base.skipped_rounds = list(state["skipped"])
    base._partition_of = dict(state["partition_of"])
    base._all_connected = True
    strategy.load_server_state(state["server"])
    arrays = ArrayRecord(state["arrays"])
    strategy.boundary = ArrayRecord(state["boundary"]) if state["boundary"] is not None else None
    if consolidates and state["round"] % rounds_per_experience == 0:
        # Saved at an experience's last round, before the server set it as the boundary.
        strategy.boundary = arrays
    rows.extend(state["rows"])
    for it, exp, accs in state["trace"]:
        trace.add(it, exp, accs)
    for node, saved in state["clients"].items():
        ctx = grid.context(int(node))
        grid.contexts[int(node)] = Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config,
                                           state=_record_dict(saved), run_config=ctx.run_config)
    return arrays, int(state["round"])
