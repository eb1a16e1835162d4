"""A real Flower deployment on loopback: a SuperLink and 2 SuperNodes as separate processes."""

import socket
import subprocess

import pytest
from typer.testing import CliRunner

from clients.deploy import DeploymentError, LocalDeployment
from lifelong.cli import app as cli
from lifelong.tracking import client_for, read_results

pytestmark = pytest.mark.integration


def flower_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "flower-super|flwr-serverapp|flwr-clientapp"], capture_output=True,
                         text=True, check=False)
    return [line for line in out.stdout.splitlines() if "<defunct>" not in line and "pgrep" not in line]


def test_two_supernodes_run_two_rounds_and_metrics_arrive_in_mlflow(tmp_path):
    """`lifelong clients launch --deployment`: a SuperLink and 2 SuperNodes as processes, `flwr run`."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sets = ["federated.clients=2", "stream.n_experiences=2", "federated.rounds=1", 'model.name="mlp"',
            "model.hidden=32", "tracking.log_model=false", "tracking.log_plots=false",
            'tracking.experiment="deployed"', f'tracking.uri="{uri}"']
    out = CliRunner().invoke(cli, ["clients", "launch", "configs/federated.toml", "--deployment",
                                   "--workdir", str(tmp_path / "flower"), *sum((["--set", s] for s in sets), [])])
    assert out.exit_code == 0, out.output
    assert "completed" in out.output and "lifelong results" in out.output
    run_id = out.output.split("lifelong results ")[1].split()[0]
    client = client_for(uri)
    res = read_results(run_id, uri)
    assert res.status == "FINISHED" and res.matrix.shape == (2, 2)
    assert client.get_run(run_id).data.tags["flwr.run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "round/avg_acc_seen")]
    assert steps == [0, 1, 2]  # initial model, then one round per experience
    assert [m.value for m in client.get_metric_history(run_id, "round/clients_ok")] == [2, 2]
    assert not flower_processes()


def test_a_port_in_use_is_refused_with_the_service_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DeploymentError, match=f"superlink: port {port} on 127.0.0.1 is already in use"):
            LocalDeployment(tmp_path, num_nodes=1, port=port).start()
    assert not flower_processes()


def test_a_service_that_dies_at_start_names_its_log(tmp_path, monkeypatch):
    dep = LocalDeployment(tmp_path, num_nodes=1)
    # A SuperNode with a flag it does not know exits at once: the error names it and its log.
    original = dep._spawn

    def spawn(name, args):
        original(name, [*args, "--no-such-flag"] if name.startswith("supernode") else args)

    monkeypatch.setattr(dep, "_spawn", spawn)
    with pytest.raises(DeploymentError, match=r"supernode0: exited with code \d+ while starting; see .*supernode0.log"):
        dep.start()
    assert not flower_processes()


def test_an_interrupted_run_resumes_on_a_deployment_whose_supernodes_load_their_state(tmp_path):
    """`lifelong clients launch --deployment --resume RUN_ID`: fresh SuperNode processes go on from
    the server's checkpoint, each client with the state it saved (here by the in-process clients
    of the interrupted run, in the same LIFELONG_HOME): its replay memory of experience 0."""
    import numpy as np
    from flwr.clientapp import ClientApp

    from clients.app import train as client_train
    from clients.state_store import saved_rounds, state_root
    from flows.federated import run_federated
    from lifelong.config import load_config

    def config(db: str):
        return load_config(None, ['flow="federated"', "federated.clients=2", "stream.n_experiences=2",
                                  "federated.rounds=1", 'model.name="mlp"', "model.hidden=32",
                                  'strategies=[{name="replay", mem_size=30}]', "tracking.log_model=false",
                                  "tracking.log_plots=false", f'tracking.uri="sqlite:///{tmp_path / db}"'])

    stop = ClientApp()

    @stop.train()
    def train(msg, context):
        if int(msg.content["config"]["server-round"]) + int(msg.content["config"]["round-offset"]) == 2:
            raise KeyboardInterrupt("the machine went down")
        return client_train(msg, context)

    cfg = config("mlruns.db")
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=stop)
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("lifelong").experiment_id])[0].info.run_id
    assert all(sorted(saved_rounds(state_root() / run_id / p)) == [1] for p in ("0", "1"))
    out = CliRunner().invoke(cli, ["clients", "launch", "--deployment", "--resume", run_id, "--tracking-uri",
                                   cfg.tracking.uri, "--workdir", str(tmp_path / "flower")])
    assert out.exit_code == 0, out.output
    assert f"lifelong results {run_id}" in out.output
    back = read_results(run_id, cfg.tracking.uri)
    assert back.status == "FINISHED" and client.get_run(run_id).data.tags["lifelong.backend"] == "deployment"
    unbroken = run_federated(config("unbroken.db"))
    assert np.allclose(back.matrix, unbroken.matrix, atol=1e-6)
    assert not flower_processes()
