"""End to end: federated continual learning through Prefect, Flower and MLflow."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from client_apps import failing_client_app, interrupting_app, recording_app, rejoining_app
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.config import load_config
from lifelong.flows.federated import initial_weights, run_federated
from lifelong.tracking import client_for, read_results

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


def fed_config(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return load_config(None, [
        'flow="federated"', 'model.name="mlp"', "model.hidden=32", "training.epochs=2", 'training.optimizer="adam"',
        "training.lr=0.01", "stream.n_experiences=2", "federated.clients=3", "federated.rounds=2",
        'strategies=[{name="replay", mem_size=30}]', f'tracking.uri="{uri}"', 'tracking.experiment="fed"', *extra,
    ])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    cfg = fed_config(tmp, "federated.eval_every_rounds=1")
    return cfg, run_federated(cfg)


def test_one_finished_run_with_round_and_experience_metrics(finished):
    cfg, result = finished
    client = client_for(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lifelong.flow"] == "federated"
    rounds = client.get_metric_history(result.run_id, "round/avg_acc_seen")
    assert [m.step for m in rounds] == [0, 1, 2, 3, 4]  # the initial model, then 2 experiences × 2 rounds
    assert [m.step for m in client.get_metric_history(result.run_id, "matrix/acc_exp0")] == [0, 1]
    assert [int(m.value) for m in client.get_metric_history(result.run_id, "round/clients_ok")] == [3, 3, 3, 3]
    assert "final/avg_accuracy" in run.data.metrics and "final/min_acc" in run.data.metrics
    assert run.data.params["federated.clients"] == "3"


def test_accuracy_matrix_is_the_last_round_of_each_experience(finished):
    cfg, result = finished
    client = client_for(cfg.tracking.uri)
    back = read_results(result.run_id, cfg.tracking.uri)
    assert np.allclose(back.matrix, result.matrix)
    last_rounds = [m for m in client.get_metric_history(result.run_id, "round/acc_exp1") if m.step in (2, 4)]
    assert [m.value for m in sorted(last_rounds, key=lambda m: m.step)] == pytest.approx(list(result.matrix[:, 1]))
    assert result.matrix[1, 1] > 0.3 > result.matrix[0, 1]  # the federation learned experience 1


def test_every_client_is_evaluated_on_its_own_share_and_the_shares_add_up_to_the_pool(finished, tmp_path):
    """Per-client continual evaluation: after each experience, each client's accuracy on its own
    test share of every experience. With IID shares covering the test split, the clients'
    accuracies weighted by their share sizes are the pooled accuracy — an independent check."""
    from lifelong.tasks.client_eval import rows_from_table

    cfg, result = finished
    client = client_for(cfg.tracking.uri)
    back = read_results(result.run_id, cfg.tracking.uri)
    table = back.client_matrix
    assert table["columns"] == ["client", "after_experience", "experience", "accuracy", "test_samples"]
    rows = rows_from_table(table)
    assert len(rows) == 2 and rows[0].shape == (3, 2)  # 2 experiences; 3 clients × 2 experiences each
    sizes = {(c, e): n for c, _, e, _, n in table["data"]}
    for after, row in enumerate(rows):
        for e in range(2):
            n = np.array([sizes[(c, e)] for c in range(3)])
            assert (row[:, e] * n).sum() / n.sum() == pytest.approx(result.matrix[after, e])
    mean = [m.value for m in sorted(client.get_metric_history(result.run_id, "clients/acc_mean"), key=lambda m: m.step)]
    assert mean == pytest.approx([rows[0][:, 0].mean(), rows[1].mean(axis=1).mean()])
    # eval_every_rounds = 1: the spread every round; at an experience's last round, the same figure
    every = sorted(client.get_metric_history(result.run_id, "clients/round_acc_mean"), key=lambda m: m.step)
    assert [m.step for m in every] == [1, 2, 3, 4] and [every[1].value, every[3].value] == pytest.approx(mean)
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["final/clients_acc_worst"] == pytest.approx(rows[1].mean(axis=1).min())
    assert metrics["final/clients_forgetting_mean"] == pytest.approx(np.mean(rows[0][:, 0] - rows[1][:, 0]))
    assert "clients_accuracy.png" in {a.path for a in client.list_artifacts(result.run_id)}
    out = CliRunner().invoke(cli, ["results", result.run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 0 and "per client" in out.output and "worst clients: client " in out.output


def test_each_client_evaluates_its_personalised_model_on_its_own_shares(finished):
    """At each experience's end every client that trained (all three here) reports its locally
    trained model's accuracy on its own test shares; the server logs their spread. The shares are
    the server's: the final global model, evaluated by each client as its own, gives the server's
    per-client row exactly — an independent check of what the clients read."""
    import mlflow
    from flwr.app import RecordDict

    from lifelong.clients.learner import ClientLearner

    cfg, result = finished
    client = client_for(cfg.tracking.uri)

    def history(key):
        return sorted(client.get_metric_history(result.run_id, f"clients/{key}"), key=lambda m: m.step)

    assert [m.step for m in history("personal_acc_mean")] == [0, 1]
    assert [m.value for m in history("personal_evaluated")] == [3, 3]
    assert all(0 <= m.value <= 1 for m in history("personal_acc_worst"))
    assert len(history("personal_gain_mean")) == 2
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    last = read_results(result.run_id, cfg.tracking.uri).client_matrix
    from lifelong.tasks.client_eval import rows_from_table

    row = rows_from_table(last)[-1]
    for pid in range(3):
        learner = ClientLearner(cfg, pid, RecordDict())
        assert learner.evaluates_personal_model
        assert learner.personal_accuracy(model, 1) == pytest.approx(list(row[pid]))


def test_under_dp_no_personal_figure_leaves_a_client(tmp_path):
    from flwr.app import RecordDict

    from lifelong.clients.learner import ClientLearner

    cfg = fed_config(tmp_path, 'privacy.clipping="flat"', "privacy.clip=1.0", "privacy.noise_multiplier=1.0")
    assert not ClientLearner(cfg, 0, RecordDict()).evaluates_personal_model


def test_split_and_client_table_are_logged(finished, tmp_path):
    cfg, result = finished
    client = client_for(cfg.tracking.uri)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"class_histograms.png", "class_histograms.json", "clients.json", "accuracy_matrix.png",
            "continual_eval.png", "config.json"} <= names
    table = json.loads(open(client.download_artifacts(result.run_id, "clients.json", str(tmp_path))).read())
    assert len(table["data"]) == 4 * 3 and {row[3] for row in table["data"]} == {"ok"}
    assert sorted({row[2] for row in table["data"]}) == [0, 1, 2]
    hists = json.loads(open(client.download_artifacts(result.run_id, "class_histograms.json", str(tmp_path))).read())
    assert np.array(hists["exp0"]).shape == (3, 10)
    assert np.array(hists["exp0"])[:, 5:].sum() == 0  # experience 0 holds classes 0-4 only


def test_logged_model_holds_the_final_global_weights(finished):
    import mlflow

    cfg, result = finished
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in result.weights.items())


def test_results_command_prints_the_global_matrix(finished):
    cfg, result = finished
    out = CliRunner().invoke(cli, ["results", result.run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 0, out.output
    assert "after exp1" in out.output and "avg_accuracy=" in out.output


def test_same_config_and_seed_give_the_same_run(finished, tmp_path):
    cfg, result = finished
    again = run_federated(fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false"))
    assert np.array_equal(again.matrix, result.matrix)
    assert all(torch.equal(again.weights[k], v) for k, v in result.weights.items())


def task_config(tmp_path, *extra):
    """Task-incremental Split-Digits (2 tasks of 5 classes, a head each), 2 clients, 1 round, 1 epoch."""
    return fed_config(tmp_path, 'stream.scenario="task"', "federated.clients=2", "federated.rounds=1",
                      "training.epochs=1", "tracking.log_plots=false",
                      f"federated.ray_cpus_per_client={torch.get_num_threads()}", *extra)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    cfg = task_config(tmp_path_factory.mktemp("fed-task"))
    return cfg, run_federated(cfg)


def test_a_task_stream_is_learned_with_a_head_per_task(task_run):
    import mlflow

    cfg, result = task_run
    m = result.matrix
    assert np.isnan(m[0, 1])  # task 1's head is untrained after experience 0: not evaluated
    assert min(m[0, 0], m[1, 0], m[1, 1]) > 0.6  # 5 classes per task: chance is 0.2
    # one head and one class mask per task; the masks stay int8 through FedAvg
    assert {k for k in result.weights if k.startswith("head.classifiers.") and k.endswith("weight")} == {
        "head.classifiers.0.classifier.weight", "head.classifiers.1.classifier.weight"}
    assert result.weights["head.active_units_T1"].tolist() == [0] * 5 + [1] * 5
    assert result.weights["head.active_units_T1"].dtype == torch.int8
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in result.weights.items())


def test_a_task_stream_gives_the_same_run_on_flowers_ray_engine(task_run, tmp_path):
    """Flower's Ray engine (a local Ray instance) and the in-process backend give the same bits: the
    matrix and every weight, heads and class masks included. Ray's actors get as many threads as
    this process uses (torch's float reductions depend on the thread count). A class-incremental
    run on a two-node Ray cluster is checked the same way in tests/clients/test_ray_cluster.py."""
    _, ours = task_run
    ray = run_federated(task_config(tmp_path, 'federated.backend="ray"', "tracking.log_model=false"))
    assert np.array_equal(ours.matrix, ray.matrix, equal_nan=True)
    assert ours.weights.keys() == ray.weights.keys()
    assert all(torch.equal(ours.weights[k], ray.weights[k]) for k in ours.weights)


def test_a_failing_client_does_not_stop_the_run(tmp_path):
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false")
    result = run_federated(cfg, client_app=failing_client_app(1))
    assert result.failures == 4 and result.skipped_rounds == []
    client = client_for(cfg.tracking.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    table = json.loads(open(client.download_artifacts(result.run_id, "clients.json", str(tmp_path))).read())
    failed = [row for row in table["data"] if row[3] == "failed"]
    assert len(failed) == 4 and all(row[1] == 2 and "disk full" in row[6] for row in failed)
    assert [int(m.value) for m in client.get_metric_history(result.run_id, "round/clients_ok")] == [2, 2, 2, 2]


def test_rounds_below_min_results_keep_the_global_model(tmp_path):
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false", "federated.min_results=3")
    result = run_federated(cfg, client_app=failing_client_app(0))
    assert result.skipped_rounds == [1, 2, 3, 4]
    client = client_for(cfg.tracking.uri)
    accs = [m.value for m in client.get_metric_history(result.run_id, "round/avg_acc_seen")]
    assert len(set(accs[:3])) == 1  # rounds 0-2 on experience 0: the initial model throughout


@pytest.mark.parametrize("args, message", [
    (["--num-clients", "500"], "500 clients but the experience has only"),
    (["--set", "federated.fraction=0.05"], "samples no client"),
    (["--set", 'federated.partition="labels"'], "federated.partition: 'labels' is not allowed"),
    (["--set", 'federated.partition="dirichlet"', "--set", "federated.alpha=0"], "must be > 0"),
    (["--set", "federated.min_results=20"], "min_results"),
    (["--set", 'strategies=[{name="joint"}]'], "not available in the federated flow"),
])
def test_bad_federated_input_is_refused_before_any_round(tmp_path, args, message):
    out = CliRunner().invoke(cli, ["clients", "launch", "configs/federated.toml",
                                   "--set", f'tracking.uri="sqlite:///{tmp_path / "m.db"}"', *args])
    assert out.exit_code == 2 and message in out.output, out.output
    assert not (tmp_path / "m.db").exists()  # no run was opened


def test_an_interrupted_run_resumes_from_its_last_round(tmp_path):
    import torch as _torch

    from lifelong.flows.checkpoints import checkpoint_file

    cfg = fed_config(tmp_path, "federated.rounds=3", "tracking.log_model=false", "tracking.log_plots=false",
                     'strategies=[{name="replay", mem_size=30, plugins=[{name="ewc", lam=5.0}]}]')
    full = run_federated(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(5))  # mid-experience 1 (rounds 4-6)
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("fed").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    assert _torch.load(checkpoint_file(run_id), weights_only=False)["round"] == 4
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 0, out.output
    back = read_results(run_id, cfg.tracking.uri)
    assert back.status == "FINISHED" and np.array_equal(back.matrix, full.matrix)
    def finals(run):
        return {k: v for k, v in client.get_run(run).data.metrics.items() if k.startswith("final/")}

    assert finals(run_id) == pytest.approx(finals(full.run_id))  # the pool's and every client's
    assert {k for k in finals(run_id) if not k.startswith("final/clients_")} == {f"final/{k}" for k in full.summary}
    history = {k: sorted(m.step for m in client.get_metric_history(run_id, k))
               for k in ("round/avg_acc_seen", "matrix/acc_exp1")}
    assert history == {"round/avg_acc_seen": list(range(7)), "matrix/acc_exp1": [0, 1]}  # once each


def test_a_client_that_comes_back_with_no_state_goes_on_from_its_saved_memory(tmp_path):
    """A node that died and came back (a fresh Context) mid-experience 1 loads the replay memory
    and EWC state it saved: the run equals the unbroken one bit for bit. Without the saved state
    it would train experience 1 with no memory of experience 0, and the models would differ."""
    cfg = fed_config(tmp_path, "federated.rounds=2", "tracking.log_model=false", "tracking.log_plots=false",
                     'strategies=[{name="replay", mem_size=30, plugins=[{name="ewc", lam=5.0}]}]')
    full = run_federated(cfg)
    back = run_federated(cfg, client_app=rejoining_app(partition=1, at_round=4))  # round 2 of experience 1
    assert np.array_equal(back.matrix, full.matrix)
    assert back.summary == pytest.approx(full.summary)


def interrupted_after_round_4(tmp_path):
    """A run of 3 clients stopped in round 5 (checkpointed after round 4): its config, MLflow client
    and run id."""
    cfg = fed_config(tmp_path, "federated.rounds=3", "tracking.log_model=false", "tracking.log_plots=false")
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(5))
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("fed").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    return cfg, client, run_id


def test_a_corrupt_client_state_stops_the_resumed_run_naming_it(tmp_path):
    import sqlite3

    from lifelong.clients import state_store

    cfg, client, run_id = interrupted_after_round_4(tmp_path)
    slots = [state_store.client_slot(state_store.state_root(), run_id, c) for c in range(3)]
    assert all(state_store.saved_rounds(s) == [3, 4] for s in slots)  # every client saved its own state
    assert {p.name for p in slots[0].run_dir.iterdir()} <= {f"states-{i:02d}.sqlite{w}" for i in range(16)
                                                           for w in ("", "-wal", "-shm")}  # rows, not files
    with sqlite3.connect(slots[1].shard) as db:
        db.execute("UPDATE states SET records = ? WHERE partition = 1 AND round = 4", (b"\0" * 100,))
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 2, out.output
    assert f"refused client state: the state of round 4 in {slots[1]} is unreadable" in " ".join(out.output.split())
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_client_whose_saved_state_is_missing_stops_the_resumed_run_naming_it(tmp_path):
    """Client 1's state is gone when the run resumes (another client-state-dir, a wiped disk): it
    trained before the checkpoint, so it refuses to go on with an empty replay memory."""
    from lifelong.clients import state_store

    cfg, client, run_id = interrupted_after_round_4(tmp_path)
    slot = state_store.client_slot(state_store.state_root(), run_id, 1)
    state_store.forget(slot)
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 2, out.output
    assert (f"refused client state: partition 1 trained in round 4 of this run, but no state it saved by then is in "
            f"{slot.run_dir}") in " ".join(out.output.split())
    assert client.get_run(run_id).info.status == "FAILED"


def test_adaptive_clipping_and_fedadam_resume_as_an_unbroken_run(tmp_path):
    """The clip bound (logged per round), FedAdam's moments and the DP noise generator are all
    server state: a run resumed mid-experience ends as the unbroken run does."""
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false", "training.epochs=1",
                     'federated.server_optimizer="fedadam"', 'privacy.clipping="per_layer"', "privacy.clip=0.5",
                     "privacy.noise_multiplier=0.3", "privacy.delta=1e-3", "privacy.adaptive_clipping=true",
                     "privacy.clipped_count_stddev=1.0")
    full = run_federated(cfg)
    client = client_for(cfg.tracking.uri)

    def bounds(run_id):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "privacy/clip_bound"),
                                                  key=lambda m: m.step)]

    logged = bounds(full.run_id)
    assert [s for s, _ in logged] == [1, 2, 3, 4] and logged[0][1] == 0.5
    assert len({v for _, v in logged}) == 4  # it moves every round
    assert "adaptive clipping" in client.get_run(full.run_id).data.tags["privacy"]
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(4))  # after round 3, mid-experience 1
    run_id = client.search_runs([client.get_experiment_by_name("fed").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 0, out.output
    assert np.array_equal(read_results(run_id, cfg.tracking.uri).matrix, full.matrix)
    assert bounds(run_id) == logged


def test_resume_refuses_a_run_without_a_checkpoint(tmp_path):
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false")
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(1))  # before any round ended
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("fed").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", cfg.tracking.uri])
    assert out.exit_code == 2 and "no checkpoint at" in out.output


def test_a_private_run_records_epsilon_per_round(tmp_path):
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false",
                     'privacy.clipping="per_layer"', "privacy.clip=0.5", "privacy.noise_multiplier=1.0",
                     "privacy.delta=1e-3")
    result = run_federated(cfg)
    client = client_for(cfg.tracking.uri)
    eps = client.get_metric_history(result.run_id, "privacy/epsilon")
    assert [m.step for m in eps] == [1, 2, 3, 4]
    values = [m.value for m in sorted(eps, key=lambda m: m.step)]
    assert all(a < b for a, b in zip(values, values[1:]))  # the budget is spent round by round
    from lifelong.privacy.accounting import epsilon

    assert values[-1] == pytest.approx(epsilon(1.0, 1.0, 4, 1e-3))  # all 3 of 3 clients every round
    tag = client.get_run(result.run_id).data.tags["privacy"]
    assert "population of 3 users" in tag and "EXTRAPOLATED" not in tag
    assert client.get_metric_history(result.run_id, "privacy/clipped_fraction")


def test_noise_changes_the_model_and_the_seed_fixes_it(tmp_path):
    private = ["tracking.log_model=false", "tracking.log_plots=false", 'privacy.clipping="flat"', "privacy.clip=0.5",
               "privacy.delta=1e-3"]
    a = run_federated(fed_config(tmp_path / "a", *private, "privacy.noise_multiplier=1.0"))
    b = run_federated(fed_config(tmp_path / "b", *private, "privacy.noise_multiplier=1.0"))
    c = run_federated(fed_config(tmp_path / "c", *private, "privacy.noise_multiplier=0.0"))
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_a_linear_probe_under_dp_keeps_its_frozen_backbone_bit_for_bit(tmp_path):
    """The server noises only what the clients train: the backbone of a `freeze_backbone` learner
    stays the initial model's exactly, while the noised head moves."""
    cfg = fed_config(tmp_path, "tracking.log_model=false", "tracking.log_plots=false", "federated.rounds=1",
                     "training.epochs=1", 'strategies=[{name="naive", freeze_backbone=true}]',
                     'privacy.clipping="per_layer"', "privacy.clip=0.5", "privacy.noise_multiplier=1.0",
                     "privacy.delta=1e-3")
    result = run_federated(cfg)
    start = initial_weights(cfg)
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(result.weights[k], start[k]) for k in backbone)
    assert all(not torch.equal(result.weights[k], start[k]) for k in start if k.startswith("head."))


@pytest.mark.parametrize("args, message", [
    (["--set", 'privacy.clipping="flat"', "--set", "privacy.target_epsilon=0.001", "--set", "privacy.delta=1e-3"],
     "target epsilon"),
    (["--set", 'privacy.clipping="flat"', "--set", "privacy.noise_multiplier=0.5", "--set", "privacy.delta=1e-3",
      "--set", "privacy.max_epsilon=1"], "privacy.max_epsilon: the run would spend epsilon"),
    (["--set", 'privacy.clipping="flat"'], "give exactly one of noise_multiplier and target_epsilon"),
    (["--set", 'privacy.clipping="flat"', "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.delta=0.2"],
     "delta 0.2 >= 1/population = 1/10"),
    (["--set", 'privacy.clipping="flat"', "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.delta=1e-3",
      "--set", "privacy.adaptive_clipping=true"], "privacy.clipped_count_stddev (default: 10 sampled clients / 20)"),
])
def test_impossible_privacy_budgets_are_refused_before_any_round(tmp_path, args, message):
    out = CliRunner().invoke(cli, ["clients", "launch", "configs/federated.toml",
                                   "--set", f'tracking.uri="sqlite:///{tmp_path / "m.db"}"', *args])
    assert out.exit_code == 2 and message in out.output, out.output
    assert not (tmp_path / "m.db").exists()


def test_prefect_retries_go_back_to_the_last_round_checkpoint(tmp_path, monkeypatch, finished):
    """A server-side failure mid-experience (here: evaluation after round 3 raises once, as when
    the tracking server drops) is retried by Prefect from the round-2 checkpoint, with the clients
    loading the state they saved; the run ends as the unbroken one."""
    import lifelong.flows.federated as ff
    _, full = finished
    calls, real = {"n": 0}, ff.ServerLoop._predict

    def flaky(*args, **kwargs):  # the global model's evaluation, once a round
        calls["n"] += 1
        if calls["n"] == 4:  # rounds 0, 1, 2 evaluated; fails on round 3
            raise ConnectionError("the tracking server went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(ff.ServerLoop, "_predict", flaky)
    retried = run_federated(fed_config(tmp_path, "training.retries=1"))
    assert calls["n"] == 4 + 2  # the retry evaluated rounds 3 and 4 only: it went on from round 2
    assert np.array_equal(retried.matrix, full.matrix)
    assert client_for(retried.tracking_uri).get_run(retried.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- OnePrompt / OVOR


def oneprompt_config(tmp_path, *extra):
    """A tiny ViT pretrained on held-apart digits (a random frozen backbone learns nothing of
    experience 1 in one epoch), 2 clients, 2 rounds per experience."""
    return fed_config(tmp_path, 'model.name="vit"', "model.vit_dim=16", "model.vit_depth=1",
                      "model.vit_heads=2", "model.vit_patch=4", "stream.holdout_fraction=0.3",
                      "pretrain.epochs=5", "pretrain.lr=0.01", "training.epochs=1", "federated.clients=2",
                      'strategies=[{name="oneprompt", vor_epochs=1, outliers_per_class=5}]',
                      "tracking.log_model=false", "tracking.log_plots=false", *extra)


@pytest.fixture(scope="module")
def oneprompt_run(tmp_path_factory):
    cfg = oneprompt_config(tmp_path_factory.mktemp("oneprompt"))
    replies: list = []
    return cfg, run_federated(cfg, client_app=recording_app(replies)), replies


def test_federated_oneprompt_learns_every_experience_on_the_frozen_backbone(oneprompt_run):
    cfg, result, _ = oneprompt_run
    m = result.matrix
    assert m.shape == (2, 2) and result.failures == 0
    assert m[0, 0] > 0.5 and m[0, 1] == 0.0  # experience 1's classes are not predicted before it
    assert m[1, 1] > 0.3 and m[1, 0] > 0.2  # learned, and experience 0 not wholly forgotten
    start = initial_weights(cfg)
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(result.weights[k], start[k]) for k in backbone)  # bit for bit
    assert not torch.equal(result.weights["prompt.params.g0"], start["prompt.params.g0"])
    assert result.weights["active"].dtype == torch.bool and bool(result.weights["active"].all())


def test_federated_oneprompt_under_user_level_dp_keeps_the_backbone_and_masks_unseen_classes(tmp_path):
    """User-level DP noises the prompt and head only; the server evaluates with the classes seen
    so far (the private mean keeps the initial all-classes mask, which would let the head predict
    experience 1's untrained classes after experience 0)."""
    # Noise std 0.01 on the average (z 0.02, C 1, 2 clients), accounted as z = 1 for 100 of 1,000
    # users: the dp-accounting PLD of a tiny z on the simulated 2 users alone takes a minute.
    cfg = oneprompt_config(tmp_path, "federated.rounds=1", 'privacy.clipping="flat"', "privacy.clip=1.0",
                           "privacy.noise_multiplier=0.02", "privacy.population=1000", "privacy.cohort=100",
                           "privacy.delta=1e-4")
    result = run_federated(cfg)
    start = initial_weights(cfg)
    backbone = [k for k in start if k.startswith("backbone.")]
    assert backbone and all(torch.equal(result.weights[k], start[k]) for k in backbone)  # bit for bit
    assert not torch.equal(result.weights["prompt.params.g0"], start["prompt.params.g0"])
    m = result.matrix
    assert m.shape == (2, 2) and result.failures == 0
    assert m[0, 0] > 0.5 and m[0, 1] == 0.0 and m[1, 1] > 0.3


def test_federated_oneprompt_runs_vor_in_each_experiences_last_round_only(oneprompt_run):
    _, _, replies = oneprompt_run
    ran = sorted((rnd, m["partition-id"], m["vor-ran"]) for rnd, m in replies)
    assert ran == [(r, p, int(r in (2, 4))) for r in (1, 2, 3, 4) for p in (0, 1)]


def test_federated_oneprompt_resumes_as_an_unbroken_run(oneprompt_run):
    """Stopped in round 4 (the last of experience 1, after the checkpoint of round 3): the resumed
    clients run VOR in it and the run ends with the unbroken run's weights."""
    cfg, full, _ = oneprompt_run  # (a second run in the same MLflow database)
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(4))
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("fed").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id
    replies: list = []
    resumed = run_federated(cfg, client_app=recording_app(replies), resume=run_id)
    assert sorted((rnd, m["vor-ran"]) for rnd, m in replies) == [(4, 1), (4, 1)]
    assert np.array_equal(resumed.matrix, full.matrix)
    assert all(torch.equal(resumed.weights[k], v) for k, v in full.weights.items())


def test_a_grid_that_keeps_only_the_cohort_in_memory_gives_the_same_run(tmp_path):
    """A generated population of 60 clients, 10 a round, replay: with the in-process grid letting
    each client's Context go after its round (it reloads its replay memory from the state store
    when next sampled), the run's every accuracy equals the run that keeps every Context — and so
    does such a run stopped in round 3 and resumed, whose clients of round 3 sampled again in round
    4 must reload their round-3 state, not the state of the round the run resumed from."""
    from lifelong.clients.inprocess import InProcessGrid
    from lifelong.clients.launch import default_client_app

    sizes = []
    original = InProcessGrid._deliver

    def deliver(self, msg):  # how many clients' states the grid holds after each message
        reply = original(self, msg)
        sizes.append(len(self.contexts))
        return reply

    def config(release: bool, name: str):
        return fed_config(tmp_path / name, 'stream.name="population"', "stream.population.panel=20",
                          "tracking.log_model=false", "tracking.log_plots=false",
                          "federated.clients=60", "federated.fraction=0.17", "training.epochs=1",
                          f"federated.release_client_states={str(release).lower()}")

    InProcessGrid._deliver = deliver
    try:
        kept = run_federated(config(False, "kept"), client_app=default_client_app())
        kept_sizes, sizes[:] = list(sizes), []
        cfg = config(True, "released")
        released = run_federated(cfg, client_app=default_client_app())
    finally:
        InProcessGrid._deliver = original
    assert np.array_equal(kept.matrix, released.matrix) and kept.summary == released.summary
    assert max(kept_sizes) > 20 and max(sizes) == 0  # 4 rounds of 10 clients kept; none once its round is done
    client = client_for(cfg.tracking.uri)

    def rows(run_id: str) -> list[dict]:
        table = json.loads(Path(client.download_artifacts(run_id, "clients.json", str(tmp_path))).read_text())
        return [dict(zip(table["columns"], r)) for r in table["data"]]

    def sampled(table, rnd: int) -> set[int]:
        return {r["partition_id"] for r in table if r["round"] == rnd}

    table = rows(released.run_id)
    assert sampled(table, 1) & (sampled(table, 2) | sampled(table, 3) | sampled(table, 4))
    assert sampled(table, 3) & sampled(table, 4)  # (what the resumed run below must get right)
    assert all(r["restored_from"] is None for r in table)  # reloaded its own state: no come-back

    stopped = config(True, "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_federated(stopped, client_app=interrupting_app(3))
    run_id = client_for(stopped.tracking.uri).search_runs(
        [client_for(stopped.tracking.uri).get_experiment_by_name("fed").experiment_id])[0].info.run_id
    out = CliRunner().invoke(cli, ["clients", "launch", "--resume", run_id, "--tracking-uri", stopped.tracking.uri])
    assert out.exit_code == 0, out.output
    assert np.array_equal(read_results(run_id, stopped.tracking.uri).matrix, kept.matrix)
