"""The multi-task flow end to end, and its refusals."""

import numpy as np
import pytest
import torch

from lifelong.config import ConfigError, load_config
from lifelong.tracking import client_for, read_results

pytestmark = pytest.mark.integration


def tiny(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mt.db'}"
    return load_config(None, [
        'flow="multitask"', "multitask.epochs=1", "multitask.batch_size=64", "multitask.hidden=16",
        'multitask.combiners=[{name="sum"}, {name="pcgrad"}, {name="gcond", mode="stochastic", accumulation=2}, '
        '{name="gcond", mode="stochastic", accumulation=2, budget="updates"}]',
        f'tracking.uri="{uri}"', 'tracking.experiment="mt"', *extra]), uri


def test_multitask_flow_logs_each_combiner(tmp_path):
    import mlflow

    from lifelong.flows.multitask import multitask_flow

    cfg, uri = tiny(tmp_path)
    result = multitask_flow(cfg)
    assert [r.label for r in result.results] == ["sum", "pcgrad", "gcond-stochastic", "gcond-stochastic@updates"]
    res = read_results(result.parent_run_id, uri)
    assert res.status == "FINISHED" and len(res.children) == 4
    client = client_for(uri)
    gcond = result.results[2]
    metrics = client.get_run(gcond.run_id).data.metrics
    assert {"conflict/min_cos", "conflict/projections", "train_loss/class", "train_loss/reconstruction",
            "test/class/accuracy", "test/reconstruction/ssim", "final/samples_per_s"} <= set(metrics)
    # one point per optimizer update: 1347 training samples // 64 per batch // K=2 batches per update
    assert len(client.get_metric_history(gcond.run_id, "conflict/min_cos")) == 1347 // 64 // 2
    # budget = "updates": as many updates as the sum makes (one batch each), so K times the data
    matched = result.results[3]
    assert len(client.get_metric_history(matched.run_id, "conflict/min_cos")) == 1347 // 64
    assert 0 <= gcond.summary["class/accuracy"] <= 1
    mlflow.set_tracking_uri(uri)
    models = client.search_logged_models([client.get_run(gcond.run_id).info.experiment_id],
                                         filter_string=f"source_run_id = '{gcond.run_id}'")
    out = mlflow.pytorch.load_model(models[0].model_uri)(torch.rand(3, 1, 8, 8))
    assert out["class"].shape == (3, 10) and out["reconstruction"].shape == (3, 64)


def test_same_seed_same_metrics(tmp_path):
    from lifelong.flows.multitask import multitask_flow

    cfg, _ = tiny(tmp_path, "tracking.log_model=false")
    a, b = multitask_flow(cfg), multitask_flow(cfg)
    for ra, rb in zip(a.results, b.results):
        assert ra.summary["class/accuracy"] == rb.summary["class/accuracy"]


def test_k_not_divisible_by_tasks_is_refused():
    with pytest.raises(ConfigError, match=r"K=3 is not divisible by the 2 tasks"):
        load_config(None, ['flow="multitask"', 'multitask.combiners=[{name="gcond", accumulation=3}]'])


def test_npz_problem_with_label_columns(tmp_path):
    from lifelong.flows.multitask import load_data, multitask_flow

    rng = np.random.default_rng(0)
    x = rng.random((120, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "mt.npz"
    np.savez(path, x=x, y_bright=(x.mean((1, 2, 3)) > 0.5).astype(int), y_left=(x[..., :4].mean((1, 2, 3)) >
                                                                             x[..., 4:].mean((1, 2, 3))).astype(int),
             y_odd=rng.integers(0, 3, 120))
    cfg, _ = tiny(tmp_path, 'multitask.problem="npz"', f'multitask.path="{path}"', "tracking.log_model=false",
                  'multitask.combiners=[{name="gcond", accumulation=3}]')
    data = load_data(cfg)
    assert [t.name for t in data.tasks] == ["bright", "left", "odd"]
    assert [t.out_dim for t in data.tasks] == [2, 2, 3]
    result = multitask_flow(cfg)
    assert {"bright/accuracy", "left/accuracy", "odd/accuracy"} <= set(result.results[0].summary)
    cfg4, _ = tiny(tmp_path, 'multitask.problem="npz"', f'multitask.path="{path}"',
                   'multitask.combiners=[{name="gcond", accumulation=4}]')
    with pytest.raises(ValueError, match="K=4 is not divisible by the 3 tasks"):
        load_data(cfg4)


def test_sequential_gcond_has_no_divisibility_constraint():
    cfg = load_config(None, ['flow="multitask"',
                             'multitask.combiners=[{name="gcond", mode="sequential", accumulation=3}]'])
    assert cfg.multitask.combiners[0].accumulation == 3


def test_results_command_prints_a_multitask_runs_final_metrics(tmp_path):
    from typer.testing import CliRunner

    from lifelong.cli.main import app
    from lifelong.flows.multitask import multitask_flow

    cfg, uri = tiny(tmp_path, "tracking.log_model=false", 'multitask.combiners=[{name="sum"}]')
    result = multitask_flow(cfg)
    out = CliRunner().invoke(app, ["results", result.parent_run_id, "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "sum" in out.output and "class/accuracy=" in out.output
