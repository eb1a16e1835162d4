"""Clients that come and go on the virtual clock, through the real ClientApp and MLflow: the three
server modes run, the same seed gives the same event log and metrics, and bad input is refused."""

import itertools
import json

import numpy as np
import pytest

from lifelong.config import ConfigError, load_config
from lifelong.flows.federated import run_federated
from lifelong.flows.virtual_clock import ClockError
from lifelong.tracking import client_for

pytestmark = pytest.mark.integration


def clock_config(tmp_path, mode, *extra, strategy='{name="replay", mem_size=30}'):
    return load_config(None, [
        'flow="federated"', 'model.name="mlp"', "model.hidden=32", "training.epochs=1", "stream.n_experiences=2",
        "federated.clients=8", f"strategies=[{strategy}]", f'tracking.uri="sqlite:///{tmp_path / "c.db"}"',
        'tracking.experiment="clock"', "tracking.log_model=false",
        (f'clock={{mode="{mode}", hours=3, experience_hours=1.5, round_minutes=10, concurrency=3, buffer=2, '
         'cohort=2, deadline_minutes=60, on_hours=4, off_hours=1}'), *extra])


@pytest.mark.parametrize("mode", ["fedbuff", "fedasync", "deadline"])
def test_each_server_mode_learns_on_the_clock_and_logs_per_hour(tmp_path, mode):
    cfg = clock_config(tmp_path, mode)
    result = run_federated(cfg)
    uri = result.tracking_uri
    client = client_for(uri)
    metrics = client.get_run(result.run_id).data.metrics
    hist = client.get_metric_history(result.run_id, "clock/avg_acc_reached")
    assert [m.step for m in hist] == [1, 2, 3]  # every virtual hour
    assert {"clock/updates_applied", "clock/updates_dropped", "clock/clients_acc_p10", "clock/clients_acc_worst",
            "clock/clients_participated", "final/avg_accuracy", "cost/updates"} <= set(metrics)
    # replay keeps local state: each client's personalised model, as it last reported it
    assert {"clock/personal_acc_mean", "clock/personal_acc_worst", "clock/personal_gain_mean"} <= set(metrics)
    assert 0 < metrics["clock/personal_evaluated"] <= 8 and 0 <= metrics["clock/personal_acc_mean"] <= 1
    assert result.matrix.shape == (2, 2) and metrics["cost/updates"] > 0
    assert result.summary["avg_accuracy"] > 0.3  # chance is 0.1: the clients' updates were applied
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"clock_events.json", "clock_clients.json", "clock.png", "accuracy_matrix.json"} <= artifacts
    client.download_artifacts(result.run_id, "clock_events.json", str(tmp_path))
    log = json.loads((tmp_path / "clock_events.json").read_text())["data"]
    kinds = {e[1] for e in log}
    assert "start" in kinds and ({"step"} if mode == "fedbuff" else {"apply"} if mode == "fedasync"
                                 else {"round_end"}) <= kinds
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(log) if a[1] != "drop" and b[1] != "drop")


def test_the_same_seed_gives_the_same_event_log_and_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        r = run_federated(clock_config(tmp_path / name, "fedbuff", strategy='{name="naive", plugins=[{name="ewc", lambda=100.0}]}'))
        client = client_for(r.tracking_uri)
        client.download_artifacts(r.run_id, "clock_events.json", str(tmp_path / name))
        runs.append((json.loads((tmp_path / name / "clock_events.json").read_text()), r.summary))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]


def test_bad_clock_input_is_refused(tmp_path):
    for extra, message in [
        (['clock={mode="fedbuff", buffer=5, concurrency=3}'], "clock.buffer: 5 updates per step"),
        (['clock={deadline_minutes=0}'], "deadline_minutes"),
        (['clock={availability="trace"}'], "clock.trace"),
        (['clock={mode="fedasync", mixing=0}'], "mixing"),
        (['clock={}', 'federated.backend="ray"'], "clock: the virtual clock runs its clients in process"),
        (['clock={}', 'privacy.clipping="flat"', "privacy.target_epsilon=1.0"], "give privacy.noise_multiplier"),
        (['clock={}', 'privacy.clipping="flat"', "privacy.noise_multiplier=1.0", "privacy.adaptive_clipping=true"],
         "fixed clip bound"),
        (['clock={concurrency=50}'], "clock.concurrency: 50 clients at a time"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ['flow="federated"', *extra])
    with pytest.raises(ConfigError, match="clients on a virtual clock are federated"):
        load_config(None, ["clock={}"])


def test_a_fleet_that_is_never_online_ends_with_a_clear_message(tmp_path):
    (tmp_path / "t.csv").write_text("client,start_hour,end_hour\n0,10,12\n")  # after the 3 hours simulated
    cfg = load_config(None, [(f'clock={{availability="trace", trace="{tmp_path / "t.csv"}", hours=3, concurrency=1, '
                              'buffer=1}'), 'flow="federated"', "federated.clients=6", 'model.name="mlp"',
                             f'tracking.uri="sqlite:///{tmp_path / "c.db"}"'])
    with pytest.raises(ClockError, match="no client is ever online with data within clock.hours = 3"):
        run_federated(cfg)


@pytest.mark.parametrize("mode", ["fedbuff", "deadline"])
def test_user_level_dp_on_the_clock_charges_applied_updates_only(tmp_path, mode):
    from lifelong.flows.privacy_ledger import read_ledger
    from lifelong.privacy.ledger import PrivacyLedger

    cfg = clock_config(tmp_path, mode, 'privacy.clipping="flat"', "privacy.noise_multiplier=1.0",
                       "privacy.delta=1e-3", "privacy.client_budget=6.0")
    result = run_federated(cfg)
    client = client_for(result.tracking_uri)
    ledger = PrivacyLedger.from_json(read_ledger(result.run_id, result.tracking_uri))
    client.download_artifacts(result.run_id, "clock_clients.json", str(tmp_path))
    table = json.loads((tmp_path / "clock_clients.json").read_text())["data"]
    # every update that arrived was charged, and nothing else: drop-outs and late ones spend nothing
    assert [ledger.participations(c) for c in range(8)] == [row[3] for row in table]
    metrics = client.get_run(result.run_id).data.metrics
    assert not [k for k in metrics if "personal" in k]  # under DP no per-client figure leaves a client
    client.download_artifacts(result.run_id, "clock_events.json", str(tmp_path))
    log = json.loads((tmp_path / "clock_events.json").read_text())["data"]
    leftover = 0
    if mode == "fedbuff":  # one noised step never holds two updates of one client (sensitivity C, not 2C)
        pending: list[int] = []
        for _, kind, who, _ in log:
            if kind == "buffer":
                assert who not in pending
                pending.append(who)
            elif kind == "step":
                pending = []
        leftover = len(pending)  # charged on arrival, never applied: counted against the client anyway
    assert len(ledger.entries) == metrics["cost/updates"] + leftover
    assert sum(row[4] for row in table) > 0  # (there were drop-outs to leave uncharged)
    assert all(ledger.spent(c) <= 6.0 for c in range(8))
    assert ledger.stops  # z = 1 at delta 1e-3: a budget of 6 buys 3 updates, so clients hit it
    assert "privacy/client_epsilon_max" in client.get_run(result.run_id).data.metrics


@pytest.mark.parametrize("mode", ["fedbuff", "deadline"])
def test_a_stopped_clock_run_resumes_from_its_last_hour_to_the_same_end(tmp_path, mode):
    """The machine dies in the middle of virtual hour 2 (a KeyboardInterrupt in a client's round,
    as in the federated resume tests); `--resume` goes on from the checkpoint of hour 1 — the
    event queue with the rounds in flight, the clients' replay memories, the generators — to the
    unbroken run's event log and metrics, and logs every hour once."""
    from client_apps import interrupting_app

    strategy = '{name="replay", mem_size=30, plugins=[{name="ewc", lambda=100.0}]}'
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    every = "clock.checkpoint_every_hours=1"
    unbroken = run_federated(clock_config(tmp_path / "a", mode, every, strategy=strategy))
    client = client_for(unbroken.tracking_uri)
    client.download_artifacts(unbroken.run_id, "clock_events.json", str(tmp_path / "a"))
    log = json.loads((tmp_path / "a" / "clock_events.json").read_text())["data"]
    trained = [e for e in log if e[1] == "start" and "outcome" not in e[3]]  # (the n-th is local round n)
    at = next(n for n, e in enumerate(trained, 1) if e[0] > 1.3)  # a round of hour 2, after hour 1's checkpoint
    cfg = clock_config(tmp_path / "b", mode, every, strategy=strategy)
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, client_app=interrupting_app(at))
    client = client_for(cfg.tracking.uri)
    run_id = client.search_runs([client.get_experiment_by_name("clock").experiment_id])[0].info.run_id
    back = run_federated(cfg, resume=run_id)
    assert back.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert back.summary == pytest.approx(unbroken.summary, abs=0, nan_ok=True)
    assert np.array_equal(back.matrix, unbroken.matrix, equal_nan=True)
    client.download_artifacts(run_id, "clock_events.json", str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "clock_events.json").read_text())["data"] == log
    assert [m.step for m in client.get_metric_history(run_id, "clock/avg_acc_reached")] == [1, 2, 3]


def test_a_clock_run_without_a_checkpoint_is_refused_with_the_reason(tmp_path):
    from lifelong.checkpoints import ResumeError

    with pytest.raises(ResumeError, match="stopped before its first evaluation"):
        run_federated(clock_config(tmp_path, "fedbuff"), resume="0123456789abcdef0123456789abcdef")
