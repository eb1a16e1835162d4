"""A real Flower deployment on loopback: a SuperLink and 2 SuperNodes as separate processes."""

import socket

import pytest
from servers import processes_mentioning
from typer.testing import CliRunner

from lifelong.cli.deploy import DeploymentError, LocalDeployment
from lifelong.cli.main import app as cli
from lifelong.tracking import client_for, read_results

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


def flower_processes(workdir) -> list[str]:
    """Flower processes of the deployment in ``workdir`` (their Flower home is there)."""
    return processes_mentioning(str(workdir), command="flower-super|flwr-serverapp|flwr-clientapp")


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
    assert not flower_processes(tmp_path)


def test_a_port_in_use_is_refused_with_the_service_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DeploymentError, match=f"superlink: port {port} on 127.0.0.1 is already in use"):
            LocalDeployment(tmp_path, num_nodes=1, port=port).start()
    assert not flower_processes(tmp_path)


def test_a_service_that_dies_at_start_names_its_log(tmp_path, monkeypatch):
    dep = LocalDeployment(tmp_path, num_nodes=1)
    # A SuperNode with a flag it does not know exits at once: the error names it and its log.
    original = dep._spawn

    def spawn(name, args, env=None):
        original(name, [*args, "--no-such-flag"] if name.startswith("supernode") else args, env)

    monkeypatch.setattr(dep, "_spawn", spawn)
    with pytest.raises(DeploymentError, match=r"supernode0: exited with code \d+ while starting; see .*supernode0.log"):
        dep.start()
    assert not flower_processes(tmp_path)


def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path):
    """Three SuperNodes; one is killed (SIGKILL, with its ClientApp process) once the first round
    has been logged. The SuperLink still lists it until its heartbeat expires, so the server keeps
    sampling it for a while: those rounds time out on it (``lost``) or get Flower's error reply
    (``failed``), aggregate the two live clients, and the run finishes."""
    import json
    import os
    import signal
    import threading
    import time

    from lifelong.cli.deploy import app_dir

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    sets = ["flow=\"federated\"", "federated.clients=3", "stream.n_experiences=2", "federated.rounds=1",
            "federated.round_timeout=60", 'model.name="mlp"', "model.hidden=32", "training.epochs=1",
            "tracking.log_model=false", "tracking.log_plots=false", 'tracking.experiment="killed"']
    run_config = {"config": str(app_dir() / "configs/federated.toml"), "set": ";".join(sets), "tracking-uri": uri}
    client = client_for(uri)
    with LocalDeployment(tmp_path / "flower", num_nodes=3) as dep:
        finished: dict = {}
        runner = threading.Thread(target=lambda: finished.update(dep.run_app(app_dir(), run_config, timeout=600)))
        runner.start()
        victim = dict(dep.procs)["supernode2"]  # partition 2
        deadline = time.monotonic() + 300
        while True:  # wait until the first round's metrics are in MLflow
            assert runner.is_alive() and time.monotonic() < deadline, "the first round never completed"
            exp = client.get_experiment_by_name("killed")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and (done := client.get_metric_history(runs[0].info.run_id, "round/clients_ok")):
                break
            time.sleep(0.2)
        killed_after = max(m.step for m in done)
        assert len(flower_processes(tmp_path)) >= 4  # the check below sees this deployment's processes
        os.killpg(victim.pid, signal.SIGKILL)
        runner.join(timeout=600)
    assert finished["status"] == "finished:completed", finished
    run_id = runs[0].info.run_id
    res = read_results(run_id, uri)
    assert res.status == "FINISHED" and res.matrix.shape == (2, 2)
    ok = {m.step: m.value for m in client.get_metric_history(run_id, "round/clients_ok")}
    table = json.loads(open(client.download_artifacts(run_id, "clients.json", str(tmp_path))).read())
    assert sorted(ok) == list(range(1, 3)) and all(v >= 2 for v in ok.values()), (killed_after, ok, table)
    victim_rows = [row for row in table["data"] if row[2] == 2]
    assert all(row[3] == "ok" for row in victim_rows if row[0] <= killed_after)
    # The round in flight at the kill may still have had its reply; none after that.
    assert not [row for row in victim_rows if row[0] > killed_after + 1 and row[3] == "ok"]
    assert [row for row in victim_rows if row[3] in ("lost", "failed")], "the dead node was never sampled again"
    assert not flower_processes(tmp_path)


def test_an_interrupted_run_resumes_on_a_deployment_whose_supernodes_load_their_state(tmp_path):
    """`lifelong clients launch --deployment --resume RUN_ID`: fresh SuperNode processes go on from
    the server's checkpoint, each client with the state it saved (here by the in-process clients
    of the interrupted run, in the same LIFELONG_HOME): its replay memory of experience 0."""
    import numpy as np
    from client_apps import interrupting_app

    from lifelong.clients.state_store import saved_rounds, state_root
    from lifelong.config import load_config
    from lifelong.flows.federated import run_federated

    def config(db: str):
        return load_config(None, ['flow="federated"', "federated.clients=2", "stream.n_experiences=2",
                                  "federated.rounds=1", 'model.name="mlp"', "model.hidden=32",
                                  'strategies=[{name="replay", mem_size=30}]', "tracking.log_model=false",
                                  "tracking.log_plots=false", f'tracking.uri="sqlite:///{tmp_path / db}"'])

    cfg = config("mlruns.db")
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(2))
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
    assert not flower_processes(tmp_path)
