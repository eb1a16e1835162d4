"""End to end: a tiny pipeline through Prefect, read back from the MLflow store."""

import json

import mlflow
import numpy as np
import pytest
import torch

from lifelong.config import load_config
from lifelong.tracking import client_for, read_results

pytestmark = pytest.mark.integration


def tiny_config(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return load_config(None, [
        'model.name="mlp"', "model.hidden=32", "training.epochs=1", "training.eval_every=4",
        'strategies=[{name="naive"}, {name="replay", mem_size=40}]',
        f'tracking.uri="{uri}"', 'tracking.experiment="e2e"', *extra,
    ]), uri


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from lifelong.flows.continual import run_continual

    tmp = tmp_path_factory.mktemp("e2e")
    # One epoch of a tiny MLP does not learn every experience, and an unhealthy model is not
    # registered: the health check is off here, where what is tested is what registration records.
    cfg, uri = tiny_config(tmp, f'tracking.gates={json.dumps(list(GATES))}', 'training.health_check="off"')
    return cfg, uri, run_continual(cfg)


GATES = ("worst_exp_accuracy >= 0", "avg_forgetting <= 0.5")


def test_one_parent_run_and_one_finished_run_per_strategy(finished):
    cfg, uri, result = finished
    res = read_results(result.parent_run_id, uri)
    assert res.status == "FINISHED"
    assert [c.name for c in res.children] == ["naive", "replay"]
    assert all(c.status == "FINISHED" for c in res.children)


def test_accuracy_matrix_is_logged_and_matches_the_result(finished):
    cfg, uri, result = finished
    for r in result.results:
        back = read_results(r.run_id, uri)
        assert back.matrix.shape == (5, 5)
        np.testing.assert_allclose(back.matrix, r.matrix)
        assert back.metrics["final/avg_accuracy"] == pytest.approx(r.summary["avg_accuracy"])


def test_continual_evaluation_trace_is_logged_per_iteration(finished):
    cfg, uri, result = finished
    client = client_for(uri)
    run_id = result.results[0].run_id
    hist = client.get_metric_history(run_id, "ceval/acc_exp0")
    steps = [m.step for m in hist]
    assert len(steps) >= 5 and steps == sorted(steps)
    # evaluated every 4 iterations (plus before the first and after the last update of each experience)
    assert any(s % 4 == 0 and s > 0 for s in steps)
    # experience 4 is only evaluated once it is seen: its first point is after experience 0's iterations
    first_exp4 = client.get_metric_history(run_id, "ceval/acc_exp4")[0].step
    assert first_exp4 > steps[0]
    assert {"ceval/min_acc", "ceval/wc_acc", "ceval/wf_10", "params"} - set(
        client.get_run(run_id).data.metrics) == {"params"}


def test_params_plots_and_trace_artifacts(finished):
    cfg, uri, result = finished
    client = client_for(uri)
    run_id = result.results[1].run_id
    run = client.get_run(run_id)
    assert run.data.params["strategy.mem_size"] == "40"
    assert run.data.params["training.epochs"] == "1"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"accuracy_matrix.json", "accuracy_matrix.png", "continual_eval.png",
            "continual_trace.json"} <= names


def test_each_strategy_is_a_lineage_whose_version_records_its_data_and_gates(finished):
    from lifelong import registry

    cfg, uri, result = finished
    for r in result.results:
        v = registry.show(uri, f"lifelong-continual-split_digits-{r.label}")
        assert v.run_id == r.run_id and v.metrics["worst_exp_accuracy"] == pytest.approx(r.matrix[-1].min())
        f = registry.lineage_fields(v)
        assert f["experiences"] == [f"exp{i}" for i in range(5)] and f["parent"] is None
        np.testing.assert_allclose(f["final_row"], r.matrix[-1], atol=1e-6)
        hashes = f["data"]["experiences"]
        assert len(hashes) == 5 and len({h["train"] for h in hashes}) == 5  # each experience its own data
        # The gates were judged on the run's own numbers, and champion follows them.
        assert [g["gate"] for g in f["gates"]] == list(GATES)
        assert f["gates"][1]["passed"] == (r.summary["avg_forgetting"] <= 0.5)
        assert ("champion" in v.aliases) == all(g["passed"] for g in f["gates"])


def test_logged_model_reloads_and_predicts_a_batch(finished):
    cfg, uri, result = finished
    mlflow.set_tracking_uri(uri)
    client = client_for(uri)
    run_id = result.results[0].run_id
    models = client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    model = mlflow.pytorch.load_model(models[0].model_uri)
    out = model(torch.rand(7, 1, 8, 8))  # any batch size: the model is not an exported graph
    assert out.shape == (7, 10)


def test_same_config_and_seed_give_the_same_metrics(tmp_path, finished):
    from lifelong.flows.continual import run_continual

    cfg, _ = tiny_config(tmp_path)
    again = run_continual(cfg)
    for a, b in zip(finished[2].results, again.results):
        np.testing.assert_array_equal(a.matrix, b.matrix)


def test_results_command_prints_the_matrix(finished):
    from typer.testing import CliRunner

    from lifelong.cli.main import app

    cfg, uri, result = finished
    out = CliRunner().invoke(app, ["results", result.parent_run_id, "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "naive" in out.output and "replay" in out.output
    assert "after exp4" in out.output and "avg_accuracy=" in out.output
    json.dumps(out.output)


def test_sample_level_dp_logs_epsilon_per_experience(tmp_path):
    from lifelong.flows.continual import run_continual

    cfg, uri = tiny_config(tmp_path, 'strategies=[{name="naive", plugins=[{name="l2", eps=1.0}]}]',
                           "privacy.sample={noise_multiplier=1.0, max_grad_norm=1.0}",
                           "tracking.log_model=false", "tracking.log_plots=false")
    result = run_continual(cfg)
    eps = client_for(uri).get_metric_history(result.results[0].run_id, "privacy/sample_epsilon")
    values = [m.value for m in sorted(eps, key=lambda m: m.step)]
    assert len(values) == 5 and all(a < b for a, b in zip(values, values[1:]))  # composed over experiences
