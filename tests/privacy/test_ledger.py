"""The per-client privacy ledger: its epsilon against the closed form of composed Gaussians, its
budgets, its persistence, and the server charging it and stopping clients at their budget."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from lifelong.bridges.flower.dp_fedavg import UserLevelDP
from lifelong.bridges.flower.fedavg import ContinualFedAvg
from lifelong.clients.inprocess import InProcessGrid
from lifelong.privacy.ledger import PrivacyLedger, composed_epsilon, read_budgets


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a mu-GDP mechanism at delta (Balle & Wang 2018, Thm 8; Dong et al. 2019):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps."""
    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(gap, 0.0, 500.0)


@pytest.mark.parametrize("history", [((1.0, 1),), ((1.0, 10),), ((2.0, 4), (0.8, 3)), ((5.0, 100),)])
def test_composed_epsilon_matches_the_closed_form_of_composed_gaussians(history):
    # k Gaussian rounds with multipliers z_i compose to mu-GDP with mu = sqrt(sum 1 / z_i^2).
    mu = math.sqrt(sum(n / z**2 for z, n in history))
    exact = gaussian_epsilon(mu, 1e-5)
    got = composed_epsilon(history, 1e-5)
    # PLD with pessimistic rounding: an upper bound, within the grid's discretisation
    assert exact - 1e-6 <= got <= exact * 1.01 + 0.01


def test_a_client_is_charged_only_for_the_rounds_it_took_part_in():
    ledger = PrivacyLedger(1e-5)
    for rnd in range(1, 6):
        ledger.record(0, "run", 0, rnd, 2.0)
    ledger.record(1, "run", 0, 3, 2.0)
    assert ledger.participations(0) == 5 and ledger.participations(1) == 1 and ledger.participations(2) == 0
    assert ledger.spent(0) == pytest.approx(gaussian_epsilon(math.sqrt(5) / 2, 1e-5), rel=0.01)
    assert ledger.spent(1) == pytest.approx(gaussian_epsilon(1 / 2, 1e-5), rel=0.01)
    assert ledger.spent(2) == 0.0
    p = ledger.percentiles(3)
    assert p["min"] == 0.0 and p["max"] == ledger.spent(0) and p["p50"] == ledger.spent(1)


def test_the_budget_stops_a_client_before_the_round_that_would_exceed_it():
    one = gaussian_epsilon(1 / 2, 1e-5)          # one round at z = 2
    two = gaussian_epsilon(math.sqrt(2) / 2, 1e-5)  # two rounds
    ledger = PrivacyLedger(1e-5, budget=(one + two) / 2, budgets={1: 10.0})
    assert ledger.can_take_part(0, 2.0)
    ledger.record(0, "run", 0, 1, 2.0)
    assert not ledger.can_take_part(0, 2.0)  # a second round would cost `two` > the budget
    assert ledger.can_take_part(0, 50.0)  # ... though a much noisier one would fit
    ledger.record(1, "run", 0, 1, 2.0)
    assert ledger.can_take_part(1, 2.0)  # its own, larger budget
    ledger.stop(2, 0, 2.0)
    ledger.stop(3, 0, 2.0)  # recorded once
    assert ledger.at_limit(3) == [0] and "budget" in ledger.stops[0][2]


def test_the_ledger_round_trips_and_refuses_another_delta():
    ledger = PrivacyLedger(1e-5, budget=3.0)
    ledger.record(2, "r1", 1, 4, 1.5)
    ledger.stop(5, 2, 1.5)
    again = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert again.entries == ledger.entries and again.stops == ledger.stops and again.spent(2) == ledger.spent(2)
    # a new run's budgets replace the saved ones
    assert PrivacyLedger.from_json(ledger.to_json(), budget=9.0).budget == 9.0
    with pytest.raises(ValueError, match="delta 1e-05.*1e-06"):
        PrivacyLedger.from_json(ledger.to_json(), delta=1e-6)


def test_budget_files(tmp_path):
    (tmp_path / "b.json").write_text('{"0": 1.5, "2": 4}')
    assert read_budgets(tmp_path / "b.json", 3) == {0: 1.5, 2: 4.0}
    (tmp_path / "b.csv").write_text("client,epsilon\n1,2.5\n")
    assert read_budgets(tmp_path / "b.csv", 3) == {1: 2.5}
    (tmp_path / "far.json").write_text('{"7": 1}')
    with pytest.raises(ValueError, match=r"clients \[7\], not among the run's 3"):
        read_budgets(tmp_path / "far.json", 3)
    (tmp_path / "neg.csv").write_text("0,-1\n")
    with pytest.raises(ValueError, match="budget <= 0"):
        read_budgets(tmp_path / "neg.csv", 3)
    with pytest.raises(ValueError, match="no file"):
        read_budgets(tmp_path / "missing.json", 3)
    (tmp_path / "b.txt").write_text("0 1")
    with pytest.raises(ValueError, match=".json or .csv"):
        read_budgets(tmp_path / "b.txt", 3)


class UnitUpdateApp:
    """Every client replies with the global model plus 1 on its one weight."""

    def __call__(self, msg, context):
        got = msg.content["arrays"].to_torch_state_dict()
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.0, "partition-id": pid, "experience": 0})
        return Message(RecordDict({"arrays": ArrayRecord({"w": got["w"] + 1.0}),
                                   "metrics": metrics}), reply_to=msg)


def test_the_server_charges_each_reply_and_stops_sampling_clients_at_their_budget():
    z = 2.0
    # Client 0 can afford 2 rounds, client 1 one, clients 2 and 3 are unlimited.
    budgets = {0: gaussian_epsilon(math.sqrt(2.5) / z, 1e-5), 1: gaussian_epsilon(math.sqrt(1.5) / z, 1e-5)}
    ledger = PrivacyLedger(1e-5, budgets=budgets)
    strategy = UserLevelDP(ContinualFedAvg(1.0, 1, 4, seed=0), "flat", 10.0, 0.0, expected_cohort=4,
                           ledger=ledger, accounted_noise_multiplier=z, run_id="r")
    grid = InProcessGrid(UnitUpdateApp(), 4)
    arrays, sent = ArrayRecord({"w": torch.zeros(1)}), []
    for rnd in range(1, 5):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        sent.append(len(msgs))
        arrays, _ = strategy.aggregate_train(rnd, list(grid.send_and_receive(msgs)))
    assert [ledger.participations(c) for c in range(4)] == [2, 1, 4, 4]
    assert sent == [4, 3, 2, 2]  # client 1 stops after round 1, client 0 after round 2
    assert [(r, c) for r, c, _ in ledger.stops] == [(2, 1), (3, 0)]
    assert all(ledger.spent(c) <= budgets[c] for c in budgets)
    # every update entered the sum with the fixed denominator: 4 + 3 + 2 + 2 unit updates over 4
    assert float(arrays.to_torch_state_dict()["w"]) == pytest.approx((4 + 3 + 2 + 2) / 4)
    # the ledger is in the server state, so a resumed run goes on with what was spent
    fresh = PrivacyLedger(1e-5, budgets=budgets)
    other = UserLevelDP(ContinualFedAvg(1.0, 1, 4, seed=0), "flat", 10.0, 0.0, expected_cohort=4,
                        ledger=fresh, accounted_noise_multiplier=z)
    other.load_server_state(strategy.server_state())
    assert [fresh.participations(c) for c in range(4)] == [2, 1, 4, 4] and fresh.stops == ledger.stops
