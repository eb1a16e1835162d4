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

from lifelong.clients import state_store
from lifelong.clients.learner import ClientLearner
from lifelong.config import Config, validate_config
from lifelong.bridges.flower.records import from_state_dict, to_state_dict

#: Keys of the train message's config record (set by the server, ``flows/federated.py``).
CONFIG_KEY = "lifelong-config"
EXPERIENCE_KEY = "experience"
#: The global round that ends the message's experience (its last round).
EXPERIENCE_END_KEY = "experience-end-round"
ROUND_OFFSET_KEY = "round-offset"
#: The global model at the end of the previous experience (sent when clients consolidate with it).
BOUNDARY_KEY = "boundary"

app = ClientApp()


@lru_cache(maxsize=4)
def _config(text: str) -> Config:
    return validate_config(json.loads(text))


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = _config(str(conf[CONFIG_KEY]))
    partition_id = int(context.node_config["partition-id"])
    if int(context.node_config.get("num-partitions", cfg.federated.clients)) != cfg.federated.clients:
        raise ValueError(f"node has num-partitions={context.node_config['num-partitions']} but the run "
                         f"splits the data across federated.clients={cfg.federated.clients}")
    server_round = int(conf[ROUND_OFFSET_KEY]) + int(conf["server-round"])
    learner = ClientLearner(cfg, partition_id, context.state)
    saved = None  # where this client saves its state, in a checkpointed run
    if state_store.RUN_KEY in conf and learner.keeps_state:
        saved = state_store.client_dir(state_store.state_root(context.node_config),
                                       str(conf[state_store.RUN_KEY]), partition_id)
        if state_store.RESUME_ROUND_KEY in conf and not list(context.state.keys()):
            state_store.restore(context.state, cfg, saved, int(conf[state_store.RESUME_ROUND_KEY]))
    boundary = to_state_dict(msg.content[BOUNDARY_KEY]) if BOUNDARY_KEY in msg.content else None
    ends_experience = EXPERIENCE_END_KEY in conf and server_round == int(conf[EXPERIENCE_END_KEY])
    weights, metrics = learner.train_round(to_state_dict(msg.content["arrays"]), int(conf[EXPERIENCE_KEY]),
                                           server_round, boundary, ends_experience, copy=False)
    arrays = from_state_dict(weights)  # at once: the weights are the worker model's own (copy=False)
    if saved is not None:
        state_store.save(context.state, cfg, saved, server_round, int(conf[state_store.SAVED_ROUND_KEY]))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)
