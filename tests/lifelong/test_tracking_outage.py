"""The MLflow server goes away in the middle of a run and comes back: the run's logger loses no value
and sends none twice (issue 22 item 3). A real ``mlflow server`` on loopback, killed with SIGKILL and
started again on the same port and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from servers import MlflowServer

from lifelong import tracking

pytestmark = pytest.mark.integration

STEPS = 100

#: A run logging through the pipeline's logger, a flush every 10 steps, MLflow's own retries on.
WRITER = """
import sys, time
from lifelong import tracking
client = tracking.client_for(sys.argv[1])
run_id = tracking.open_run(client, "writer", {}, {"lifelong.flow": "test"}, experiment="outage")
print(run_id, flush=True)
logger = tracking.MLflowLogger(run_id, client)
for step in range(%(steps)d):
    logger.log_values({"m/a": float(step)}, step)
    if step %% 10 == 9:
        logger.flush()
    time.sleep(0.05)
logger.flush()
client.set_terminated(run_id, "FINISHED")
""" % {"steps": STEPS}


def kill(server: MlflowServer) -> None:
    os.killpg(server.pgid, signal.SIGKILL)
    server.stop()


def steps_logged(uri: str, run_id: str, key: str = "m/a") -> list[int]:
    return sorted(m.step for m in tracking.client_for(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the file: each test kills it and starts it again."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


def test_a_run_keeps_logging_across_a_server_restart(server):
    # MLflow's retries, sooner than its default back-off (2 s, 4 s, 8 s, ...): the test's wait.
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, server.uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    run_id = writer.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while len(steps_logged(server.uri, run_id)) < 20:
        assert time.monotonic() < deadline and writer.poll() is None, writer.stderr.read()[-2000:]
        time.sleep(0.1)
    kill(server)
    time.sleep(1)  # the writer's flushes meet a closed port meanwhile
    server.start()
    _, err = writer.communicate(timeout=180)
    assert writer.returncode == 0, err[-2000:]
    assert steps_logged(server.uri, run_id) == list(range(STEPS))  # none lost, none twice
    assert tracking.client_for(server.uri).get_run(run_id).info.status == "FINISHED"


def test_a_flush_that_fails_keeps_its_values_for_the_next(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, as after MLflow's retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    client = tracking.client_for(server.uri)
    run_id = tracking.open_run(client, "r", {}, {"lifelong.flow": "test"}, experiment="outage")
    logger = tracking.MLflowLogger(run_id, client)
    logger.log_values({"m/a": 1.0}, 0)
    logger.flush()
    kill(server)
    logger.log_values({"m/a": 2.0}, 1)
    logger.set_tags({"t": "x"})
    with pytest.raises(Exception):
        logger.flush()
    assert [p[3] for p in logger.pending()] == [1]  # kept, not dropped
    server.start()
    logger.flush()
    assert logger.pending() == []
    assert steps_logged(server.uri, run_id) == [0, 1]
    assert client.get_run(run_id).data.tags["t"] == "x"
