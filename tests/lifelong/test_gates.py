"""Promotion gates (lifelong/gates.py): parsing, each verdict against hand-computed cases, and the
refusal of a gate the run cannot judge, before any work."""

import math

import pytest

from lifelong.config import ConfigError, load_config
from lifelong.gates import Gate, GateError, check_gates, decision, evaluate, parse_gate


@pytest.mark.parametrize("text, gate", [
    ("avg_accuracy >= champion - 0.01", Gate("avg_accuracy", ">=", None, -0.01)),
    ("avg_accuracy>=champion", Gate("avg_accuracy", ">=", None, 0.0)),
    ("avg_forgetting < champion + 0.05", Gate("avg_forgetting", "<", None, 0.05)),
    ("avg_forgetting <= 0.15", Gate("avg_forgetting", "<=", 0.15)),
    ("worst_exp_accuracy > .5", Gate("worst_exp_accuracy", ">", 0.5)),
    ("epsilon <= 8e0", Gate("epsilon", "<=", 8.0)),
])
def test_parse(text, gate):
    assert parse_gate(text) == gate
    assert parse_gate(str(gate)) == gate  # what is recorded on a version parses back to the same gate


@pytest.mark.parametrize("text", ["avg_accuracy", "avg_accuracy == 0.9", "avg_accuracy >= champion * 2",
                                  "avg_accuracy >= production", ">= 0.5", "avg_accuracy >= champion -"])
def test_malformed_gates_are_refused_with_the_syntax(text):
    with pytest.raises(GateError, match="is not a gate; write"):
        parse_gate(text)


def test_verdicts_by_hand():
    gates = [parse_gate(g) for g in ("avg_accuracy >= champion - 0.01", "avg_forgetting <= 0.15",
                                     "worst_exp_accuracy >= 0.5")]
    champion = {"avg_accuracy": 0.90, "avg_forgetting": 0.05}
    # 0.895 >= 0.90 - 0.01 = 0.89: passes; 0.20 <= 0.15 fails; 0.5 >= 0.5 passes (a tie).
    r = evaluate(gates, {"avg_accuracy": 0.895, "avg_forgetting": 0.20, "worst_exp_accuracy": 0.5}, champion,
                 "champion v3")
    assert [x.passed for x in r] == [True, False, True]
    assert r[0].reason == "avg_accuracy 0.895 >= champion v3's 0.9 - 0.01"
    assert r[1].reason == "avg_forgetting 0.2 not <= 0.15"
    passed, why = decision(r)
    assert not passed and why == "gates failed: avg_forgetting <= 0.15 (avg_forgetting 0.2 not <= 0.15)"
    # 0.885 < 0.89: the champion gate fails by the margin.
    assert not evaluate(gates[:1], {"avg_accuracy": 0.885}, champion)[0].passed


def test_no_champion_passes_a_relative_gate_but_a_missing_metric_never_passes():
    g = [parse_gate("avg_accuracy >= champion - 0.01")]
    (r,) = evaluate(g, {"avg_accuracy": 0.3}, None)
    assert r.passed and "no champion yet" in r.reason
    assert not evaluate(g, {}, None)[0].passed
    assert not evaluate(g, {"avg_accuracy": math.nan}, None)[0].passed
    (r,) = evaluate(g, {"avg_accuracy": 0.9}, {"bwt": 0.0}, "champion v1")
    assert not r.passed and r.reason == "champion v1 has no avg_accuracy to compare with"
    assert decision(evaluate(g, {"avg_accuracy": 0.3}, None))[0]


def test_a_gate_on_a_metric_the_run_does_not_produce_is_refused():
    assert len(check_gates(["clients_acc_worst >= 0.6"], "federated", clock=False, dp=False)) == 1
    assert len(check_gates(["epsilon <= 8", "client_epsilon_max <= 10"], "federated", clock=False, dp=True)) == 2
    with pytest.raises(GateError, match="'clients_acc_worst', which this continual run does not produce"):
        check_gates(["avg_accuracy > 0", "clients_acc_worst >= 0.6"], "continual", clock=False, dp=False)
    with pytest.raises(GateError, match=r"tracking.gates\[0\].*privacy metrics need a federated run with user-level DP"):
        check_gates(["epsilon <= 8"], "federated", clock=False, dp=False)
    with pytest.raises(GateError, match="multi-task run has no accuracy matrix"):
        check_gates(["avg_accuracy > 0"], "multitask", clock=False, dp=False)


@pytest.mark.parametrize("sets, message", [
    (['tracking.gates=["avg_acuracy >= 0.5"]'], "'avg_acuracy', which this continual run does not produce"),
    (['tracking.gates=["avg_accuracy >= 0.5"]', 'tracking.promote_if="avg_accuracy>champion"'],
     "the gates decide 'champion'"),
    (['tracking.gates=["avg_accuracy >= 0.5"]', "tracking.log_model=false"], "need tracking.log_model"),
])
def test_the_config_refuses_gates_it_cannot_apply(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)
