"""Promotion gates: what a new model version must satisfy before it becomes ``champion``.

Why: in production a model replaces the current one only if it is better *without forgetting too
much*; one "higher average accuracy" rule (``tracking.promote_if``) cannot say that. Gates are
declared in the config (``tracking.gates``), one condition each, and a finished run's version
becomes ``champion`` only when every gate passes (lifelong/registry.py records each verdict and
its reason on the version). Syntax, one per string::

    avg_accuracy >= champion - 0.01     no worse than the current champion, less a margin
    avg_forgetting <= 0.15              an absolute bound
    worst_exp_accuracy >= 0.5           the worst experience of the final row of the matrix
    clients_acc_worst >= 0.6            federated: the worst client's accuracy on what it has seen
    epsilon <= 8                        user-level DP: the run's epsilon (``client_epsilon_max``:
                                        the ledger's worst client)
    drift_p_value >= 0.01               a continuation (``tracking.continue_from``): the new data's
                                        drift test (flows/continuation.py); a small p-value means
                                        the new experience differs from those learned, and a
                                        person should look before it is promoted

``champion`` may be followed by ``+ NUMBER`` or ``- NUMBER``. A gate against the champion passes
when no version holds ``champion`` yet (said in its reason). A metric the run did not produce, or
a NaN, fails its gate: a gate never passes by default.

Which metrics a run produces is known before it starts (:func:`produced_metrics`), so a gate on
one it will not produce is refused with the config, before any training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CHAMPION = "champion"
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_GATE = re.compile(rf"\s*(?P<metric>[\w./-]+)\s*(?P<op>>=|<=|>|<)\s*(?:(?P<champion>{CHAMPION})"
                   rf"\s*(?:(?P<sign>[+-])\s*(?P<margin>{_NUMBER}))?|(?P<value>{_NUMBER}))\s*")
_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
SYNTAX = ('"METRIC OP NUMBER" or "METRIC OP champion [+|- NUMBER]", OP one of >, >=, <, <=; '
          'e.g. "avg_accuracy >= champion - 0.01", "avg_forgetting <= 0.15"')

#: What every continual-learning run (continual or federated) reports at its end.
CONTINUAL_METRICS = ("avg_accuracy", "avg_forgetting", "bwt", "worst_exp_accuracy", "min_acc", "wc_acc",
                     "wf_10", "wf_100")
#: Federated runs: the spread of the clients' accuracy on what each has seen (tasks/client_eval.py),
#: and of their forgetting (synchronous rounds only: on the virtual clock experiences end per client).
_SPREAD = ("mean", "p10", "p50", "p90", "worst", "std")
CLIENT_ACC_METRICS = tuple(f"clients_acc_{k}" for k in _SPREAD)
CLIENT_FORGETTING_METRICS = tuple(f"clients_forgetting_{k}" for k in _SPREAD)
#: Federated runs with user-level DP: the run's epsilon and the ledger's worst client.
PRIVACY_METRICS = ("epsilon", "client_epsilon_max")
#: Continuations: the drift test of the new experiences against the learned ones.
DRIFT_METRICS = ("drift_p_value", "drift_statistic")


class GateError(ValueError):
    """A gate that cannot be parsed, or names a metric the run will not produce."""


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    #: The absolute bound, or None for a gate against the champion.
    value: float | None = None
    #: Added to the champion's value (``champion - 0.01``: margin -0.01).
    margin: float = 0.0

    @property
    def against_champion(self) -> bool:
        return self.value is None

    def __str__(self) -> str:
        if self.value is not None:
            return f"{self.metric} {self.op} {self.value:g}"
        return f"{self.metric} {self.op} {CHAMPION}" + (f" {'-' if self.margin < 0 else '+'} {abs(self.margin):g}"
                                                       if self.margin else "")


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    reason: str

    def to_json(self) -> dict:
        return {"gate": self.gate, "passed": self.passed, "reason": self.reason}


def parse_gate(text: str, key: str = "tracking.gates") -> Gate:
    m = _GATE.fullmatch(text)
    if m is None:
        raise GateError(f"{key}: {text!r} is not a gate; write {SYNTAX}")
    if m["champion"]:
        margin = float(m["margin"] or 0.0) * (-1 if m["sign"] == "-" else 1)
        return Gate(m["metric"], m["op"], None, margin)
    return Gate(m["metric"], m["op"], float(m["value"]))


def produced_metrics(flow: str, *, clock: bool, dp: bool, continuing: bool = False) -> set[str]:
    """The final metrics a run of ``flow`` reports, which gates may name."""
    if flow == "multitask":
        return set()
    out = set(CONTINUAL_METRICS) | (set(DRIFT_METRICS) if continuing else set())
    if flow == "federated":
        out |= set(CLIENT_ACC_METRICS) | (set() if clock else set(CLIENT_FORGETTING_METRICS))
        out |= set(PRIVACY_METRICS) if dp else set()
    return out


def check_gates(texts: Iterable[str], flow: str, *, clock: bool, dp: bool, continuing: bool = False) -> list[Gate]:
    """Parse every gate and refuse one on a metric the run will not produce (before any work)."""
    gates = [parse_gate(t, f"tracking.gates[{i}]") for i, t in enumerate(texts)]
    if gates and flow == "multitask":
        raise GateError("tracking.gates: gates judge continual lineages (flow continual or federated); a "
                        "multi-task run has no accuracy matrix to gate on")
    produced = produced_metrics(flow, clock=clock, dp=dp, continuing=continuing)
    for i, g in enumerate(gates):
        if g.metric not in produced:
            hint = ""
            if g.metric in CLIENT_ACC_METRICS + CLIENT_FORGETTING_METRICS:
                hint = (" (per-client accuracy is measured in federated runs; per-client forgetting in "
                        "synchronous ones, not on the virtual clock)")
            elif g.metric in PRIVACY_METRICS:
                hint = " (privacy metrics need a federated run with user-level DP)"
            elif g.metric in DRIFT_METRICS:
                hint = " (drift is measured when a run continues a lineage: tracking.continue_from)"
            raise GateError(f"tracking.gates[{i}]: {str(g)!r} names {g.metric!r}, which this {flow} run does not "
                            f"produce{hint}; it produces {', '.join(sorted(produced))}")
    return gates


def evaluate(gates: Iterable[Gate], metrics: Mapping[str, float],
             champion: Mapping[str, float] | None, champion_label: str = CHAMPION) -> list[GateResult]:
    """Each gate's verdict for a version with ``metrics``, against the champion's (None: no champion)."""
    out = []
    for g in gates:
        mine = metrics.get(g.metric)
        if mine is None or math.isnan(mine):
            out.append(GateResult(str(g), False, f"this version has no {g.metric}"))
            continue
        if g.against_champion:
            theirs = None if champion is None else champion.get(g.metric)
            if champion is None:
                out.append(GateResult(str(g), True, f"no {CHAMPION} yet to compare with ({g.metric} {mine:.4g})"))
                continue
            if theirs is None or math.isnan(theirs):
                out.append(GateResult(str(g), False, f"{champion_label} has no {g.metric} to compare with"))
                continue
            bound = theirs + g.margin
            where = f"{champion_label}'s {theirs:.4g}" + (f" {'-' if g.margin < 0 else '+'} {abs(g.margin):g}"
                                                         if g.margin else "")
        else:
            bound, where = g.value, f"{g.value:g}"
        ok = _OPS[g.op](float(mine), float(bound))
        out.append(GateResult(str(g), ok, f"{g.metric} {mine:.4g} {'' if ok else 'not '}{g.op} {where}"))
    return out


def decision(results: Iterable[GateResult]) -> tuple[bool, str]:
    """Whether every gate passed, and one line saying why (the failures first)."""
    results = list(results)
    failed = [r for r in results if not r.passed]
    if failed:
        return False, "gates failed: " + "; ".join(f"{r.gate} ({r.reason})" for r in failed)
    return True, "all gates passed: " + "; ".join(r.reason for r in results)
