"""A real Flower deployment on loopback: a SuperLink and 2 SuperNodes as separate processes."""

import socket
import subprocess

import pytest
from typer.testing import CliRunner

from clients.deploy import DeploymentError, LocalDeployment, app_dir
from lifelong.cli import app as cli
from lifelong.tracking import client_for, read_results

pytestmark = pytest.mark.integration


def flower_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "flower-super|flwr-serverapp|flwr-clientapp"], capture_output=True,
                         text=True, check=False)
    return [line for line in out.stdout.splitlines() if "<defunct>" not in line and "pgrep" not in line]


def test_two_supernodes_run_two_rounds_and_metrics_arrive_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    overrides = ["federated.clients=2", "stream.n_experiences=2", "federated.rounds=1", 'model.name="mlp"',
                 "model.hidden=32", "tracking.log_model=false", 'tracking.experiment="deployed"']
    with LocalDeployment(tmp_path / "flower", num_nodes=2) as dep:
        run = dep.run_app(app_dir(), {"config": "configs/federated.toml", "set": ";".join(overrides),
                                      "tracking-uri": uri})
    assert run["status"] == "finished:completed", open(run["log"]).read()[-3000:]
    client = client_for(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("deployed").experiment_id],
                                  f"tags.`flwr.run_id` = '{run['run-id']}'")
    res = read_results(found.info.run_id, uri)
    assert res.status == "FINISHED" and res.matrix.shape == (2, 2)
    steps = [m.step for m in client.get_metric_history(found.info.run_id, "round/avg_acc_seen")]
    assert steps == [0, 1, 2]  # initial model, then one round per experience
    assert [m.value for m in client.get_metric_history(found.info.run_id, "round/clients_ok")] == [2, 2]
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


def test_cli_deployment_prints_the_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = CliRunner().invoke(cli, [
        "clients", "launch", "configs/federated.toml", "--deployment", "--num-clients", "2",
        "--workdir", str(tmp_path / "flower"), "--set", "stream.n_experiences=1", "--set", "federated.rounds=1",
        "--set", 'model.name="mlp"', "--set", "tracking.log_model=false", "--set", "tracking.log_plots=false",
        "--set", f'tracking.uri="{uri}"'])
    assert out.exit_code == 0, out.output
    assert "completed" in out.output and "lifelong results" in out.output
    assert not flower_processes()
