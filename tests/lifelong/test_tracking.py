"""MLflow tracking: batching, figures (Avalanche's logging into it: tests/bridges/avalanche)."""

import numpy as np
import torch

from lifelong import tracking


def test_logger_batches_and_skips_non_numbers(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    client = tracking.client_for(uri)
    run = client.create_run(tracking.experiment_id(client, "b"))
    calls = []
    real = client.log_batch
    monkeypatch.setattr(client, "log_batch", lambda *a, **k: calls.append(len(k["metrics"])) or real(*a, **k))
    logger = tracking.MLflowLogger(run.info.run_id, client)
    for step in range(2500):
        logger.log_single_metric("m", step / 2500, step)
    logger.log_single_metric("img", torch.zeros(3), 0)  # not a number: skipped
    logger.log_single_metric("nan", float("nan"), 0)  # NaN: skipped
    logger.flush()
    assert calls == [1000, 1000, 500]
    assert len(client.get_metric_history(run.info.run_id, "m")) == 2500
    assert "img" not in client.get_run(run.info.run_id).data.metrics


def test_tags_go_with_the_next_batch_of_metrics_within_mlflows_limit(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 't.db'}"
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.experiment_id(client, "t")).info.run_id
    calls = []
    real = client.log_batch
    monkeypatch.setattr(client, "log_batch",
                        lambda *a, **k: calls.append((len(k["metrics"]), len(k["tags"]))) or real(*a, **k))
    logger = tracking.MLflowLogger(run_id, client)
    logger.set_tags({"server_optimizer": "fedavg", "privacy": "none"})
    assert calls == []  # nothing sent yet
    logger.log_values({f"m{i}": float(i) for i in range(1500)}, 0)  # a full batch: sent with the tags
    logger.flush()
    assert calls[0] == (998, 2)  # the tags with the first batch, 1,000 entities at most in all
    assert all(m + t <= 1000 for m, t in calls) and sum(m for m, _ in calls) == 1500
    data = client.get_run(run_id).data
    assert data.tags["server_optimizer"] == "fedavg" and data.tags["privacy"] == "none"
    assert len(data.metrics) == 1500


def test_pending_values_restored_after_a_flush_are_not_logged_twice(tmp_path):
    """What a federated checkpoint keeps (values not yet sent) may have been sent before the
    process died: sent again with their own timestamps, MLflow keeps each value once."""
    uri = f"sqlite:///{tmp_path / 'p.db'}"
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.experiment_id(client, "p")).info.run_id
    logger = tracking.MLflowLogger(run_id, client)
    logger.log_values({"a": 0.5, "b": 1.0}, 3)
    saved = logger.pending()
    logger.flush_if_older(3600)  # not an hour old: stays buffered
    assert logger.pending() == saved
    logger.flush()
    assert logger.pending() == []
    resumed = tracking.MLflowLogger(run_id, client)
    resumed.restore(saved)
    resumed.log_values({"a": 0.7}, 4)
    resumed.flush_if_older(0)
    history = client.get_metric_history(run_id, "a")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.5), (4, 0.7)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "b")] == [(3, 1.0)]


def test_figures_render(tmp_path):
    m = np.array([[0.9, 0.1], [0.5, 0.95]])
    fig = tracking.matrix_figure(m, ["exp0", "exp1"], "t")
    fig.savefig(tmp_path / "m.png")
    fig2 = tracking.curve_figure([(0, 0, {0: 0.1}), (5, 0, {0: 0.9}), (5, 1, {0: 0.9, 1: 0.0}),
                                  (10, 1, {0: 0.4, 1: 0.8})], ["exp0", "exp1"], "t")
    fig2.savefig(tmp_path / "c.png")
    assert (tmp_path / "m.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000


def test_an_experiment_created_meanwhile_by_another_process_is_used_not_an_error(tmp_path):
    """Eight sweep processes opening their first run at once race to create the experiment (seen on
    PostgreSQL: RESOURCE_ALREADY_EXISTS); the loser uses the winner's."""
    from lifelong.tracking import client_for, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    winner, loser = client_for(uri), client_for(uri)
    made = winner.create_experiment("raced")
    real, looks = loser.get_experiment_by_name, []

    def stale_first(name):  # the loser's first look came before the winner created it
        looks.append(name)
        return None if len(looks) == 1 else real(name)

    loser.get_experiment_by_name = stale_first
    assert experiment_id(loser, "raced") == made
    assert len(looks) == 2  # it tried to create it, was told it exists, and looked again
