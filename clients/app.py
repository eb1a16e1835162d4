"""The Flower ClientApp (Message API): a continual learner on the node's private data.

Each train message carries the global model (``arrays``), the model the previous experience
ended with (``boundary``, when the learner has regularisers to consolidate), and a ``config`` record with the
experience index, the round, the global round that ends the experience (OnePrompt's VOR phase
runs in it: a client cannot know otherwise, ``clients/learner.py``) and the run's Lifelong config
(as JSON: the server is the one source of truth, so the same app runs under the in-process
backend, Flower's Ray engine and real SuperNodes without a config file on the client's machine).
The node's ``partition-id`` (from its node config) says which share of each experience is its
own. The reply holds the new weights and metrics: share size, training loss, partition id,
experience, under ``[privacy.sample]`` the client's sample-level epsilon so far, and with
``oneprompt`` whether its VOR phase ran (``clients/learner.py``).

In a checkpointed run the client also saves its state after every successful round, and a
resumed run's clients load it back (``clients/state_store.py``): Ray actors and SuperNodes keep
their state where the server cannot reach it.
"""

from __future__ import annotations

import json
from functools import lru_cache

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.clients import state_store
from lifelong.clients.learner import ClientLearner
from lifelong.config import Config, validate_config

app = ClientApp()


@lru_cache(maxsize=4)
def _config(text: str) -> Config:
    return validate_config(json.loads(text))


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content[protocol.CONFIG]
    cfg = _config(str(conf[protocol.RUN_CONFIG]))
    partition_id = int(context.node_config[protocol.NODE_PARTITION_ID])
    if int(context.node_config.get(protocol.NUM_PARTITIONS, cfg.federated.clients)) != cfg.federated.clients:
        raise ValueError(f"node has num-partitions={context.node_config['num-partitions']} but the run "
                         f"splits the data across federated.clients={cfg.federated.clients}")
    server_round = int(conf[protocol.ROUND_OFFSET]) + int(conf[protocol.SERVER_ROUND])
    learner = ClientLearner(cfg, partition_id, context.state)
    saved = None  # where this client saves its state, in a checkpointed run
    if protocol.STATE_RUN in conf and learner.keeps_state:
        saved = state_store.client_dir(state_store.state_root(context.node_config),
                                       str(conf[protocol.STATE_RUN]), partition_id)
        if protocol.RESUME_ROUND in conf and not list(context.state.keys()):
            state_store.restore(context.state, cfg, saved, int(conf[protocol.RESUME_ROUND]))
    boundary = to_state_dict(msg.content[protocol.BOUNDARY]) if protocol.BOUNDARY in msg.content else None
    ends_experience = protocol.EXPERIENCE_END in conf and server_round == int(conf[protocol.EXPERIENCE_END])
    weights, metrics = learner.train_round(to_state_dict(msg.content[protocol.ARRAYS]), int(conf[protocol.EXPERIENCE]),
                                           server_round, boundary, ends_experience, copy=False)
    arrays = from_state_dict(weights)  # at once: the weights are the worker model's own (copy=False)
    if saved is not None:
        state_store.save(context.state, cfg, saved, server_round, int(conf[protocol.SAVED_ROUND]))
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)
