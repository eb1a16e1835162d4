"""A real Flower deployment on loopback: a SuperLink and 2 SuperNodes as separate processes."""

import socket
from pathlib import Path

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


def test_a_supernode_killed_mid_run_is_survived_and_comes_back_with_its_saved_state(tmp_path):
    """Three SuperNodes; one is killed (SIGKILL, with its ClientApp and its warm worker) once the
    first round has been logged, and started again at once, as a new process. The round in flight
    times out on the dead node (``lost``), aggregates the two live clients, and goes on; a later
    round samples the new node (the SuperLink drops the dead one when its heartbeat expires), whose
    client finds no state in its fresh process and goes on from the replay memory it saved before
    it died (``restored_from`` in ``clients.json``); the run finishes."""
    import json
    import os
    import signal
    import threading
    import time

    from lifelong.cli.deploy import app_dir
    from lifelong.clients.state_store import client_slot, saved_rounds, state_root

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # Four rounds (two experiences of two): the kill lands in round 2, the new node is sampled in
    # round 3 (round 4 too, should the dead node still be listed when round 3 starts: it is then lost again).
    sets = ["flow=\"federated\"", "federated.clients=3", "stream.n_experiences=2", "federated.rounds=2",
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
            assert runner.is_alive() and time.monotonic() < deadline, f"the first round never completed: {finished}"
            exp = client.get_experiment_by_name("killed")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and (done := client.get_metric_history(runs[0].info.run_id, "round/clients_ok")):
                break
            time.sleep(0.2)
        killed_after = max(m.step for m in done)
        assert len(flower_processes(tmp_path)) >= 4  # the check below sees this deployment's processes
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        dep.restart_node(2)
        runner.join(timeout=600)
    assert finished["status"] == "finished:completed", finished
    run_id = runs[0].info.run_id
    res = read_results(run_id, uri)
    assert res.status == "FINISHED" and res.matrix.shape == (2, 2)
    ok = {m.step: m.value for m in client.get_metric_history(run_id, "round/clients_ok")}
    table = json.loads(Path(client.download_artifacts(run_id, "clients.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(ok) == list(range(1, 5)) and all(v >= 2 for v in ok.values()), (killed_after, ok, rows)
    victim_rows = [r for r in rows if r["partition_id"] == 2]
    before = [r for r in victim_rows if r["round"] <= killed_after]
    assert before and all(r["status"] == "ok" and r["restored_from"] is None for r in before)
    assert [r for r in victim_rows if r["status"] in ("lost", "failed")], "the dead node was never sampled again"
    # The new process's client: a new node id, the same partition, and the state it saved before
    # the kill (the round in flight at the kill may still have had its reply: saved too).
    back = [r for r in victim_rows if r["status"] == "ok" and r["round"] > killed_after + 1]
    assert back, rows
    old_node = before[0]["node_id"]
    assert back[0]["node_id"] != old_node and back[0]["restored_from"] in (killed_after, killed_after + 1), rows
    assert all(r["restored_from"] is None for r in back[1:])  # loaded once; then its own Context.state
    assert max(saved_rounds(client_slot(state_root(), run_id, 2))) == 4  # and it saved again after the last round
    assert not flower_processes(tmp_path)


def test_an_interrupted_run_resumes_on_a_deployment_whose_supernodes_load_their_state(tmp_path):
    """`lifelong clients launch --deployment --resume RUN_ID` (a SuperLink and 2 SuperNodes as
    processes, `flwr run`, metrics into the same MLflow run): fresh SuperNode processes go on from
    the server's checkpoint, each client with the state it saved (here by the in-process clients
    of the interrupted run, in the same LIFELONG_HOME): its replay memory of experience 0."""
    import numpy as np
    from client_apps import interrupting_app

    from lifelong.clients.state_store import client_slot, saved_rounds, state_root
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
    assert all(saved_rounds(client_slot(state_root(), run_id, p)) == [1] for p in (0, 1))
    out = CliRunner().invoke(cli, ["clients", "launch", "--deployment", "--resume", run_id, "--tracking-uri",
                                   cfg.tracking.uri, "--workdir", str(tmp_path / "flower")])
    assert out.exit_code == 0, out.output
    assert "completed" in out.output and f"lifelong results {run_id}" in out.output
    back = read_results(run_id, cfg.tracking.uri)
    tags = client.get_run(run_id).data.tags
    assert back.status == "FINISHED" and tags["lifelong.backend"] == "deployment" and tags["flwr.run_id"]
    # One metric per round, the deployed round's beside the in-process one's: nothing lost or twice.
    assert [m.step for m in client.get_metric_history(run_id, "round/avg_acc_seen")] == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "round/clients_ok")] == [2, 2]
    unbroken = run_federated(config("unbroken.db"))
    assert np.allclose(back.matrix, unbroken.matrix, atol=1e-6)
    assert not flower_processes(tmp_path)
