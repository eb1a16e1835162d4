"""One train message, handled: a client's continual-learning round on the node's private data.

Each train message carries the global model (``arrays``), the model the previous experience
ended with (``boundary``, when the learner has regularisers to consolidate), and a ``config`` record with the
experience index, the round, the global round that ends the experience (OnePrompt's VOR phase
runs in it: a client cannot know otherwise, ``clients/learner.py``) and the run's Lifelong config
(as JSON: the server is the one source of truth, so the same code runs under the in-process
backend, Flower's Ray engine and real SuperNodes without a config file on the client's machine).
The node's ``partition-id`` (from its node config) says which share of each experience is its
own. The reply holds the new weights and metrics: share size, training loss, partition id,
experience, under ``[privacy.sample]`` the client's sample-level epsilon so far, and with
``oneprompt`` whether its VOR phase ran (``clients/learner.py``).

In a checkpointed run the client also saves its state after every successful round, and a
resumed run's clients load it back (``clients/state_store.py``): Ray actors and SuperNodes keep
their state where the server cannot reach it. Under user-level DP with clients' own records, the
client records each round it sends an update in, and reports the rounds of runs the server's
ledger does not hold (``clients/privacy_record.py``).

This module imports the learning stack (PyTorch, Avalanche); ``clients/app.py`` imports it only
in a process that handles messages itself, never in a deployed SuperNode's per-message process
(``clients/node_worker.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache

from flwr.app import MetricRecord, RecordDict

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.checkpoints import ResumeError
from lifelong.clients import privacy_record, state_store
from lifelong.clients.learner import ClientLearner
from lifelong.config import Config, validate_config


@lru_cache(maxsize=4)
def _config(text: str) -> Config:
    return validate_config(json.loads(text))


def train_reply(content: RecordDict, state: RecordDict, node_config: Mapping[str, object]) -> RecordDict:
    """The reply's content to a train message with ``content``; ``state`` (the node's
    ``Context.state``) is read and updated in place."""
    conf = content[protocol.CONFIG]
    cfg = _config(str(conf[protocol.RUN_CONFIG]))
    partition_id = int(node_config[protocol.NODE_PARTITION_ID])
    if int(node_config.get(protocol.NUM_PARTITIONS, cfg.federated.clients)) != cfg.federated.clients:
        raise ValueError(f"node has num-partitions={node_config[protocol.NUM_PARTITIONS]} but the run "
                         f"splits the data across federated.clients={cfg.federated.clients}")
    server_round = int(conf[protocol.ROUND_OFFSET]) + int(conf[protocol.SERVER_ROUND])
    learner = ClientLearner(cfg, partition_id, state)
    saved = None  # where this client saves its state, in a checkpointed run
    restored = None  # the round of the saved state it went on from, when it loaded one
    if protocol.STATE_RUN in conf and learner.keeps_state:
        saved = state_store.client_slot(state_store.state_root(node_config),
                                        str(conf[protocol.STATE_RUN]), partition_id)
        resume_rounds = [int(r) for r in conf.get(protocol.RESUME_ROUNDS, [])]
        if not list(state.keys()):
            # An empty state in a checkpointed run: a resumed run's first message, a node that died
            # and came back mid-run (a new SuperNode process, fresh Context; in a resumed run too),
            # or a virtual client whose Context the in-process grid let go after its last round of
            # this process's run: it goes on from the newest state it saved before this round that
            # this attempt of the run can go on from (``state_store``: none after the round a
            # resume went on from, unless this attempt saved it).
            released = bool(node_config.get(protocol.NODE_RELEASED))
            restored = state_store.restore(state, cfg, saved, server_round - 1, resume_rounds)
            if restored is None and protocol.TRAINED_PARTITIONS in conf:
                _check_nothing_was_saved(conf, partition_id, saved)
            if released:
                if restored is None:
                    raise ResumeError(f"{state_store.REFUSED}: partition {partition_id} saved its state after its "
                                      f"last round, but {saved} holds none; was the run's state folder removed?")
                restored = None  # its own state, as it left it: no come-back
    boundary = to_state_dict(content[protocol.BOUNDARY]) if protocol.BOUNDARY in content else None
    ends_experience = protocol.EXPERIENCE_END in conf and server_round == int(conf[protocol.EXPERIENCE_END])
    weights, metrics = learner.train_round(to_state_dict(content[protocol.ARRAYS]), int(conf[protocol.EXPERIENCE]),
                                           server_round, boundary, ends_experience, copy=False,
                                           report_personal=bool(conf.get(protocol.REPORT_PERSONAL, 0)))
    arrays = from_state_dict(weights)  # at once: the weights are the worker model's own (copy=False)
    if saved is not None:  # every reply of a round must have the same keys (Flower's check): -1 for none
        metrics[protocol.RESTORED_ROUND] = -1 if restored is None else restored
    if protocol.LEDGER_RUNS in conf:
        metrics[protocol.PRIOR_DP_ROUNDS] = _record_dp_round(conf, cfg, node_config, partition_id, server_round)
    if saved is not None:
        state_store.save(state, cfg, saved, server_round, int(conf[protocol.SAVED_ROUND]), len(resume_rounds))
    return RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(metrics)})


def _record_dp_round(conf, cfg: Config, node_config: Mapping[str, object], partition_id: int,
                     server_round: int) -> list[float]:
    """Record this round in the client's own DP record; the rounds it recorded in runs the
    server's ledger does not hold (read first: this round is in a run it holds)."""
    root, population = state_store.state_root(node_config), privacy_record.population_key(cfg)
    runs = [str(r) for r in conf[protocol.LEDGER_RUNS]]
    prior = privacy_record.prior_rounds(root, population, partition_id, runs)
    privacy_record.record(root, population, partition_id, runs[0], server_round, int(conf[protocol.EXPERIENCE]),
                          float(conf[protocol.DP_ACCOUNTED_Z]))
    return prior


def _check_nothing_was_saved(conf, partition_id: int, saved) -> None:
    """A resumed run's client that found no state: refused if the server's checkpoint says it had
    trained (its saved state is missing: another client-state-dir, a wiped disk), rather than
    going on with an empty memory as if it had not."""
    trained = dict(zip((int(p) for p in conf[protocol.TRAINED_PARTITIONS]),
                       (int(r) for r in conf[protocol.TRAINED_ROUNDS])))
    if partition_id in trained:
        raise ResumeError(f"{state_store.REFUSED}: partition {partition_id} trained in round {trained[partition_id]} "
                          f"of this run, but no state it saved by then is in {saved.run_dir} (a different client-state-dir "
                          f"or {state_store.ENV_VAR}, or the folder was removed); point the client at its saved state")
