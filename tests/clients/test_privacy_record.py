"""A client's own record of its user-level DP rounds (clients/privacy_record.py), and the server
charging what clients report from runs its ledger does not hold (bridges/flower/dp_fedavg.py)."""

import sqlite3

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from lifelong.bridges.flower import protocol
from lifelong.bridges.flower.dp_fedavg import CLIENT_RECORD, UserLevelDP
from lifelong.bridges.flower.fedavg import ContinualFedAvg
from lifelong.clients import privacy_record
from lifelong.clients.inprocess import InProcessGrid
from lifelong.config import load_config
from lifelong.privacy.ledger import PrivacyLedger


def test_rounds_of_other_runs_are_reported_and_a_round_is_recorded_once(tmp_path):
    rec = privacy_record.record
    rec(tmp_path, "pop", 3, "run-a", 1, 0, 1.0)
    rec(tmp_path, "pop", 3, "run-a", 1, 0, 1.0)  # the same round again (a retried message): once
    rec(tmp_path, "pop", 3, "run-a", 2, 0, 1.0)
    rec(tmp_path, "pop", 3, "run-b", 1, 0, 2.0)
    rec(tmp_path, "pop", 4, "run-b", 1, 0, 2.0)  # another client
    rec(tmp_path, "other", 3, "run-c", 1, 0, 5.0)  # partition 3 of another population
    assert privacy_record.prior_rounds(tmp_path, "pop", 3, ["run-c"]) == [1.0, 1.0, 2.0]
    assert privacy_record.prior_rounds(tmp_path, "pop", 3, ["run-b"]) == [1.0, 1.0]
    assert privacy_record.prior_rounds(tmp_path, "pop", 3, ["run-a", "run-b"]) == []
    assert privacy_record.prior_rounds(tmp_path / "none", "pop", 3, []) == []  # no record yet: nothing
    with sqlite3.connect(tmp_path / privacy_record.FILE) as db:  # one file for every client
        assert db.execute("SELECT COUNT(*) FROM rounds").fetchone() == (5,)


def test_the_population_is_what_the_clients_hold():
    base = ['flow="federated"', "federated.clients=3"]
    key = privacy_record.population_key
    same = key(load_config(None, base)), key(load_config(None, [*base, "federated.rounds=9", "training.epochs=3"]))
    assert same[0] == same[1]  # how a run trains does not change who its clients are
    for other in ("federated.clients=4", "seed=1", 'federated.partition="dirichlet"', "stream.n_experiences=2"):
        assert key(load_config(None, [*base, other])) != same[0], other


class ReportingApp:
    """Replies with the model it got and, as its own record's earlier rounds, ``prior[pid]``."""

    def __init__(self, prior):
        self.prior, self.configs = prior, []

    def __call__(self, msg, context):
        pid = int(context.node_config["partition-id"])
        self.configs.append(dict(msg.content["config"]))
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "partition-id": pid, "experience": 0,
                                protocol.PRIOR_DP_ROUNDS: self.prior[pid]})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)


def test_the_server_charges_what_clients_report_once_and_drops_an_update_beyond_the_budget():
    # z = 1 at delta 1e-3: one round costs epsilon ~3.0, two ~4.6, three ~5.9 (budget 5 buys two)
    ledger = PrivacyLedger(1e-3, budget=5.0)
    ledger.record(0, "earlier", 0, 1, 1.0)  # a run this ledger continues (privacy.ledger_from)
    app = ReportingApp({0: [], 1: [1.0, 1.0]})
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 2, seed=0), "flat", 10.0, 0.0, 2, ledger=ledger,
                           accounted_noise_multiplier=1.0, run_id="now", client_records=True)
    grid, arrays = InProcessGrid(app, 2), ArrayRecord({"w": torch.zeros(2)})
    for rnd in (1, 2):
        strategy.aggregate_train(rnd, list(grid.send_and_receive(
            list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid)))))
    # the messages said which runs the ledger holds (this one first) and the round's z
    assert app.configs[0][protocol.LEDGER_RUNS] == ["now", "earlier"] and app.configs[0][protocol.DP_ACCOUNTED_Z] == 1.0
    # client 1's two earlier rounds were charged once (it reported them in both rounds): with them
    # it could not afford round 1, so its update was dropped and it was stopped
    assert [(e.run, e.round) for e in ledger.entries if e.client == 1] == [(CLIENT_RECORD, 1), (CLIENT_RECORD, 1)]
    # client 0: one round of the continued run and round 1 of this one (4.6); a third would exceed 5
    assert [e.run for e in ledger.entries if e.client == 0] == ["earlier", "now"]
    assert [(r, c) for r, c, _ in ledger.stops] == [(1, 1), (2, 0)]
    # a client whose record grew since (a run this ledger never heard of) is charged the difference
    app.prior[1] = [1.0, 1.0, 2.0]
    strategy._charge_client_records(3, [Message(RecordDict({"metrics": MetricRecord(
        {"partition-id": 1, protocol.PRIOR_DP_ROUNDS: [1.0, 1.0, 2.0]})}), dst_node_id=2, message_type="train")])
    assert sorted(e.noise_multiplier for e in ledger.entries if e.client == 1) == [1.0, 1.0, 2.0]


def test_without_client_records_the_messages_ask_for_nothing():
    app = ReportingApp({0: []})
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 1, seed=0), "flat", 1.0, 0.0, 1, ledger=PrivacyLedger(1e-3),
                           run_id="now")
    grid = InProcessGrid(app, 1)
    list(grid.send_and_receive(list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}),
                                                             ConfigRecord(), grid))))
    assert protocol.LEDGER_RUNS not in app.configs[0] and protocol.DP_ACCOUNTED_Z not in app.configs[0]


def test_client_records_need_user_level_dp_and_are_not_on_the_clock():
    from lifelong.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.client_records: the per-client ledger accounts user-level DP"):
        load_config(None, ['flow="federated"', "privacy.client_records=true"])
