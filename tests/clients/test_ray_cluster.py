"""A real two-node Ray cluster on loopback: `ray start --head`, `ray start --address`, and a
federated run whose client actors are placed on it (``federated.ray_address``)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import processes_mentioning

from lifelong.cli.supervisor import free_port
from lifelong.clients.state_store import ENV_VAR, saved_partitions
from lifelong.config import load_config
from lifelong.flows.federated import run_federated

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

RAY = Path(sys.executable).parent / "ray"


def config(tmp_path, *extra):
    return load_config(None, [
        'flow="federated"', 'model.name="mlp"', "model.hidden=32", "training.epochs=2", 'training.optimizer="adam"',
        "training.lr=0.01", "stream.n_experiences=2", "federated.clients=2", "federated.rounds=1",
        'strategies=[{name="replay", mem_size=30}]', f'tracking.uri="sqlite:///{tmp_path / "mlruns.db"}"',
        "tracking.log_model=false", "tracking.log_plots=false", *extra])


@pytest.fixture
def cluster(tmp_path):
    """A head and a second node, one CPU each, every client state kept where its node's
    environment says (a folder per node); stopped by killing exactly the processes it started
    (`ray stop` would stop every Ray on the machine, another test's included)."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "LIFELONG_HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        subprocess.run([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", str(temp),
                        "--disable-usage-stats"], check=True, capture_output=True, timeout=120,
                       env={**env, ENV_VAR: str(tmp_path / "state-head")})
        subprocess.run([str(RAY), "start", "--address", address, "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--disable-usage-stats"], check=True, capture_output=True, timeout=120,
                       env={**env, ENV_VAR: str(tmp_path / "state-node2")})
        yield address
    finally:
        for line in processes_mentioning(str(temp)):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while processes_mentioning(str(temp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
    assert not processes_mentioning(str(temp))


def test_a_run_on_a_two_node_cluster_uses_both_nodes_and_equals_the_single_node_run(tmp_path, cluster):
    on_cluster = run_federated(config(tmp_path / "a", 'federated.backend="ray"', f'federated.ray_address="{cluster}"',
                                      "federated.ray_cpus_per_client=1"))
    # Both nodes ran clients: each saved the state of the clients it trained in its own folder
    # (Flower's pool hands a round's client to whichever actor is free, so a client may train on
    # either node from round to round; its Context travels with the message).
    saved = {node: set().union(*(saved_partitions(run) for run in (tmp_path / node).iterdir()))
             for node in ("state-head", "state-node2")}
    assert all(saved.values()) and set.union(*saved.values()) == {0, 1}, saved
    # The same seed on one node (in this process, one thread as each actor had) gives the same bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = run_federated(config(tmp_path / "b"))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(here.matrix, on_cluster.matrix)
    assert all(torch.equal(here.weights[k], on_cluster.weights[k]) for k in here.weights)


def test_an_address_where_no_cluster_answers_is_refused_before_any_work(tmp_path):
    cfg = config(tmp_path, 'federated.backend="ray"', f'federated.ray_address="127.0.0.1:{free_port()}"')
    with pytest.raises(ValueError, match=r"federated.ray_address: no Ray cluster answers at 127.0.0.1:\d+"):
        run_federated(cfg)
    assert not (tmp_path / "mlruns.db").exists()  # no run was opened


def test_an_address_for_another_backend_or_not_host_port_is_refused(tmp_path):
    with pytest.raises(ValueError, match='federated.ray_address is for backend = "ray"'):
        config(tmp_path, 'federated.ray_address="127.0.0.1:6379"')
    with pytest.raises(ValueError, match="'head-node' is not host:port"):
        config(tmp_path, 'federated.backend="ray"', 'federated.ray_address="head-node"')
