"""A model that stopped learning is reported, never mistaken for forgetting: `lifelong run` warns
(or, with training.health_check = "fail", stops with a one-line error) and `lifelong results` says so."""

import pytest
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.tracking import client_for

pytestmark = pytest.mark.integration

# SGD at lr 1e6 blows the weights up on the first experience: non-finite, dead, not learned.
DIVERGING = ['model.name="mlp"', "model.hidden=16", "training.epochs=1", "stream.n_experiences=2",
             'training.optimizer="sgd"', "training.lr=1e6", 'strategies=[{name="naive"}]', "training.eval_every=0"]


def _run(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["run"] + [a for s in [*DIVERGING, f'tracking.uri="{uri}"', *extra] for a in ("--set", s)]
    return uri, CliRunner().invoke(cli, args)


def test_warn_reports_the_experience_and_results_shows_it(tmp_path):
    uri, res = _run(tmp_path)
    assert res.exit_code == 0, res.output
    client = client_for(uri)
    (child,) = [r for r in client.search_runs([client.get_experiment_by_name("lifelong").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["lifelong.health"] == "unhealthy"
    assert "exp0: not learned" in child.data.tags["lifelong.health.problems"]
    assert child.data.metrics["health/ok"] == 0.0
    shown = CliRunner().invoke(cli, ["results", child.info.run_id, "--tracking-uri", uri])
    assert "UNHEALTHY" in shown.output and "exp0: non-finite weights or outputs" in shown.output
    assert not client.search_registered_models()  # an unhealthy model is not registered


def test_fail_stops_the_run_with_one_line(tmp_path):
    uri, res = _run(tmp_path, 'training.health_check="fail"')
    assert res.exit_code == 2 and "error: naive: exp0:" in res.output and "marked FAILED" in res.output
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("lifelong").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"}
