"""Clients that come and go on the virtual clock, through the real ClientApp and MLflow: the three
server modes run, the same seed gives the same event log and metrics, and bad input is refused."""

import itertools
import json

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
