"""The warm path of a deployed node: its messages trained in one long-lived worker process.

The worker is started the way a SuperNode's per-message ClientApp process starts it
(``node_worker.call``); here the node is named by this test process, so the worker ends with
the test's own kill. The deployment tests (tests/cli/test_deploy.py) run it under real SuperNodes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.records import from_state_dict, to_state_dict
from lifelong.clients import node_worker
from lifelong.clients import state as st
from lifelong.clients.round import train_reply
from lifelong.config import load_config
from lifelong.flows.federated import initial_weights

pytestmark = pytest.mark.integration


def config():
    return load_config(None, ['flow="federated"', 'model.name="mlp"', "model.hidden=16", "training.epochs=1",
                              "federated.clients=2", "federated.rounds=1", "stream.n_experiences=5",
                              'strategies=[{name="replay", mem_size=20}]'])


def message(cfg, weights, experience: int) -> RecordDict:
    conf = ConfigRecord({protocol.EXPERIENCE: experience, protocol.ROUND_OFFSET: experience,
                         protocol.SERVER_ROUND: 1, protocol.RUN_CONFIG: json.dumps(cfg.model_dump(mode="json")),
                         protocol.EXPERIENCE_END: experience + 1})
    return RecordDict({protocol.ARRAYS: from_state_dict(weights), protocol.CONFIG: conf})


NODE_CONFIG = {protocol.NODE_PARTITION_ID: 1, protocol.NUM_PARTITIONS: 2}


@pytest.fixture(scope="module")
def node():
    """A node named by a process of the test's own, which it ends afterwards (as a SuperNode that
    stops): its worker must then exit by itself. One node for the module (a worker's start imports
    the learning stack, ~10 s); the tests run in order and the last one ends it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


def worker_pid(node: int) -> int:
    """The pid of the worker that started last for ``node`` (its log says)."""
    started = [line for line in node_worker.paths(node)["log"].read_text().splitlines() if "listening" in line]
    return int(started[-1].split("[node worker ")[1].split("]")[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a worker is this process's child only by way of Popen: reap it if it has exited
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def test_rounds_through_the_worker_equal_rounds_in_process_and_the_state_comes_back(node):
    cfg = config()
    w = initial_weights(cfg)
    here_state, there_state = RecordDict(), RecordDict()
    for experience in range(3):
        here = train_reply(message(cfg, w, experience), here_state, NODE_CONFIG)
        there = node_worker.call(message(cfg, w, experience), there_state, NODE_CONFIG, node=node.pid)
        a, b = to_state_dict(here[protocol.ARRAYS]), to_state_dict(there[protocol.ARRAYS])
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert dict(here[protocol.METRICS]) == dict(there[protocol.METRICS])
        w = a
    # The client's memory lives in the node's state, not in the worker: the replay buffer of
    # experiences 0 and 1 came back with the reply.
    assert {k.split("/")[0] for k in st.read_tensors(there_state, st.REPLAY)} == {"0", "1"}
    assert st.read_progress(there_state) == st.read_progress(here_state)
    first = worker_pid(node.pid)
    node_worker.call(message(cfg, w, 2), RecordDict(), NODE_CONFIG, node=node.pid)
    assert worker_pid(node.pid) == first  # one worker served every message


def test_a_killed_worker_fails_its_message_and_the_next_message_starts_a_new_one(node):
    cfg = config()
    w = initial_weights(cfg)
    node_worker.call(message(cfg, w, 0), RecordDict(), NODE_CONFIG, node=node.pid)
    first = worker_pid(node.pid)
    os.kill(first, signal.SIGKILL)
    while alive(first):
        time.sleep(0.05)
    reply = node_worker.call(message(cfg, w, 0), RecordDict(), NODE_CONFIG, node=node.pid)
    assert protocol.ARRAYS in reply
    assert worker_pid(node.pid) != first


def test_an_error_in_training_is_the_messages_and_names_its_cause(node):
    cfg = config()
    bad = message(cfg, initial_weights(cfg), 0)
    with pytest.raises(node_worker.NodeWorkerError, match="num-partitions=3 but the run splits the data across "
                                                          "federated.clients=2"):
        node_worker.call(bad, RecordDict(), {**NODE_CONFIG, protocol.NUM_PARTITIONS: 3}, node=node.pid)
    # the worker goes on
    assert protocol.ARRAYS in node_worker.call(bad, RecordDict(), NODE_CONFIG, node=node.pid)


def test_the_worker_exits_when_its_node_is_gone(node):
    cfg = config()
    node_worker.call(message(cfg, initial_weights(cfg), 0), RecordDict(), NODE_CONFIG, node=node.pid)
    pid, sock = worker_pid(node.pid), node_worker.paths(node.pid)["sock"]
    node.kill()
    node.wait()  # reaped: a zombie would still count as alive
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not sock.exists()


def test_the_message_process_imports_neither_torch_nor_avalanche():
    out = subprocess.run([sys.executable, "-c", "import sys, lifelong.clients.app; "
                          "print(sorted(m for m in ('torch', 'avalanche', 'mlflow', 'prefect') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_switch_is_checked():
    env = {**os.environ, node_worker.SWITCH: "maybe"}
    out = subprocess.run([sys.executable, "-c", "from lifelong.clients import node_worker; node_worker.wanted()"],
                         capture_output=True, text=True, env=env, check=False)
    assert "LIFELONG_NODE_WORKER='maybe': expected auto, on or off" in out.stderr
