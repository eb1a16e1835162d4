"""The native stack (``cli/local_stack.py``, ``make stack``): real MLflow and Prefect servers, a Prefect
worker, a Flower SuperLink and SuperNodes on loopback; a federated pipeline run through them."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import processes_mentioning

from lifelong.cli.deploy import LocalDeployment, app_dir
from lifelong.cli.local_stack import Stack, StackError, read_state, stack_processes
from lifelong.tracking import client_for, read_results

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lifelong.cli.stack", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_stack_runs_a_federated_pipeline_and_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / "stack"
    up = cli("up", "--detach", "--workdir", str(workdir), "--supernodes", "2", "--no-ui", "--mlflow-port", "0",
             "--prefect-port", "0", "--worker-port", "0", "--superlink-port", "0")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_state(workdir)
        assert "export MLFLOW_TRACKING_URI=" in up.stdout and "export PREFECT_API_URL=" in up.stdout
        mlflow_url, prefect_api = state["urls"]["mlflow"], state["urls"]["prefect"]
        assert stack_processes(state["stack_id"])

        st = cli("status", "--workdir", str(workdir))
        assert st.returncode == 0 and st.stdout.count("healthy") == 4, st.stdout + st.stderr
        with urllib.request.urlopen(f"{prefect_api}/work_pools/lifelong", timeout=5) as r:
            assert json.load(r)["type"] == "process"  # the worker created its pool

        # The Lifelong ServerApp, submitted with `flwr run` to the stack's SuperLink, logs to its MLflow.
        overrides = ["federated.clients=2", "stream.n_experiences=2", "federated.rounds=1", 'model.name="mlp"',
                     "model.hidden=32", "tracking.log_model=false", "tracking.log_plots=false",
                     'tracking.experiment="stack"']
        port = int(state["urls"]["superlink"].rsplit(":", 1)[1])
        submit = LocalDeployment(workdir / "flower", num_nodes=2, port=port)  # its connection, not started
        run = submit.run_app(app_dir(), {"config": "configs/federated.toml", "set": ";".join(overrides),
                                         "tracking-uri": mlflow_url}, timeout=240)
        assert run["status"] == "finished:completed", Path(run["log"]).read_text()[-3000:]

        client = client_for(mlflow_url)
        (found,) = client.search_runs([client.get_experiment_by_name("stack").experiment_id],
                                      f"tags.`flwr.run_id` = '{run['run-id']}'")
        res = read_results(found.info.run_id, mlflow_url)
        assert res.status == "FINISHED" and res.matrix.shape == (2, 2)
        assert [m.value for m in client.get_metric_history(found.info.run_id, "round/clients_ok")] == [2, 2]
        assert (workdir / "mlflow.db").exists()  # SQLite by default, in the stack's folder
    finally:
        down = cli("down", "--workdir", str(workdir))
    assert down.returncode == 0 and "stack stopped" in down.stdout, down.stdout + down.stderr
    assert not stack_processes(state["stack_id"])
    assert not processes_mentioning(str(tmp_path))
    assert not (workdir / "stack.json").exists()


def test_a_port_in_use_is_refused_naming_the_service_and_nothing_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        stack = Stack(tmp_path / "stack", ports={"mlflow": 0, "prefect-server": port, "prefect-worker": 0,
                                                 "superlink": 0})
        with pytest.raises(StackError, match=rf"prefect-server: port {port} on 127.0.0.1 is already in use.*"
                                             r"prefect-server\.log"):
            stack.up()
    assert not stack_processes(stack.stack_id)


def test_a_missing_service_binary_is_named(tmp_path):
    stack = Stack(tmp_path / "stack", ports=dict.fromkeys(("mlflow", "prefect-server", "prefect-worker",
                                                           "superlink"), 0), bin_dir=tmp_path / "no-bin")
    with pytest.raises(StackError, match=r"mlflow: .*no-bin/mlflow not found"):
        stack.up()
    assert not stack_processes(stack.stack_id)


def test_a_service_not_healthy_in_time_stops_everything_already_started(tmp_path):
    # MLflow gets no time at all; Prefect's server and the Flower SuperLink + SuperNode are up
    # (or starting) by then, and must all be stopped.
    stack = Stack(tmp_path / "stack", ports=dict.fromkeys(("mlflow", "prefect-server", "prefect-worker",
                                                           "superlink"), 0),
                  n_supernodes=1, prefect_ui=False, timeouts={"mlflow": 0.0})
    started = []
    original = stack._wait_healthy

    def wait(name):
        started.extend(stack_processes(stack.stack_id))
        if name == "mlflow":  # never healthy: a loaded machine may have it up before the first check
            stack.health_urls["mlflow"] = "http://127.0.0.1:9/health"  # the discard port: nobody answers
        original(name)

    stack._wait_healthy = wait
    with pytest.raises(StackError, match=r"mlflow: not healthy after 0 s .*; see .*/stack/mlflow\.log"):
        stack.up()
    assert len(started) >= 4  # mlflow, prefect server, superlink, supernode at least
    assert not stack_processes(stack.stack_id)
    assert not processes_mentioning(str(tmp_path))


def test_a_database_uri_without_its_driver_is_named(tmp_path, monkeypatch):
    import lifelong.cli.local_stack as stack_mod

    monkeypatch.setitem(stack_mod.DRIVERS, "postgresql", ("no_such_driver_module", "psycopg2-binary"))
    stack = Stack(tmp_path / "stack", ports=dict.fromkeys(("mlflow", "prefect-server", "prefect-worker",
                                                           "superlink"), 0),
                  mlflow_backend_uri="postgresql://lifelong:secret@db.example:5432/mlflow")
    with pytest.raises(StackError, match=r"mlflow: the backend postgresql://lifelong:\*\*\*@db.example:5432/mlflow "
                                         r"needs a database driver .*pip install psycopg2-binary") as err:
        stack.up()
    assert "secret" not in str(err.value)
    assert not stack_processes(stack.stack_id)


def test_foreground_stack_stops_everything_on_ctrl_c(tmp_path):
    workdir = tmp_path / "stack"
    proc = subprocess.Popen([sys.executable, "-m", "lifelong.cli.stack", "up", "--workdir", str(workdir),
                             "--supernodes", "1", "--no-ui", "--mlflow-port", "0", "--prefect-port", "0",
                             "--worker-port", "0", "--superlink-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving; Ctrl-C" in line:
                break
        state = read_state(workdir)
        assert state and stack_processes(state["stack_id"]), "".join(lines)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "stack stopped" in out, "".join(lines) + out
    assert not stack_processes(state["stack_id"])
    assert not processes_mentioning(str(tmp_path))
