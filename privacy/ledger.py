"""Per-client privacy ledger for user-level DP: each client's epsilon from the rounds it took part in.

A run's user-level epsilon (``privacy/accounting.py``) is one number for a uniformly sampled client
of a fixed population. In federated *continual* learning a client takes part in some rounds of
some experiences, and again in later runs that continue from this one; what it (and the operator)
needs is how much of *its* budget is spent. This module keeps that account.

**What is accounted.** Every round a client's clipped update enters the noised sum, the round is a
Gaussian mechanism for that client with sensitivity C and noise std ``z C`` (``z``: the noise
multiplier the accountant accounts, ``UserLevelPrivacy.noise_multiplier``; with adaptive clipping
the update and the noised count together cost that one mechanism, Andrew et al. 2021, Thm 1). A
round the client sat out costs it nothing. A client's loss is the composition of its rounds —
individual accounting in the sense of Feldman & Zrnic ("Individual Privacy Accounting via a Rényi
Filter", NeurIPS 2021): the rounds a client sat out do not count, and no amplification by sampling
is claimed (the ledger treats who took part as known; the run-level epsilon treats it as secret,
so a client that took part often can show a ledger epsilon above the run's).

**Accountant.** dp_accounting's privacy-loss-distribution accountant (``PLDAccountant``,
pessimistic rounding: an upper bound), the one the run-level epsilon uses, so the two numbers are
comparable; for compositions of Gaussian mechanisms it is nearly exact (tested against the
closed form of the composed Gaussian, Balle & Wang 2018). The budget stops a client *before* a
participation that would exceed it. Whether a client is stopped depends only on its participation
history (public randomness), never on data, so its loss is a fixed composition of at most that
many Gaussian rounds and the usual composition theorem covers it; the Rényi-filter argument of
Feldman & Zrnic is not needed.

**Persistence.** The ledger is a list of entries ``(client, run, experience, round, z)``; it is
saved with the run (MLflow artifact ``privacy_ledger.json``, and in the run's checkpoint so a
resumed run goes on with it) and a later run can start from it (``privacy.ledger_from``), so
budgets are not reset by starting a new run.

Plain Python + dp_accounting; no Flower, Prefect or MLflow here.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant

from lifelong.privacy.accounting import VALUE_DISCRETIZATION_INTERVAL

LEDGER_FILE = "privacy_ledger.json"


@dataclass(frozen=True)
class Participation:
    client: int
    run: str
    experience: int
    round: int
    #: The accounted noise multiplier of that round's Gaussian mechanism.
    noise_multiplier: float


@functools.lru_cache(maxsize=4096)
def composed_epsilon(history: tuple[tuple[float, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms composed: ``history`` is ``((z, count), ...)``."""
    if not history:
        return 0.0
    accountant = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
    accountant.compose(dp_event.ComposedDpEvent(
        [dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), n) for z, n in history]))
    return float(accountant.get_epsilon(delta))


def _history(zs: Counter) -> tuple[tuple[float, int], ...]:
    return tuple(sorted(zs.items()))


@dataclass
class PrivacyLedger:
    """Who spent what. ``budget``: the default per-client epsilon (None: unlimited); ``budgets``:
    per-client overrides."""

    delta: float
    budget: float | None = None
    budgets: dict[int, float] = field(default_factory=dict)
    entries: list[Participation] = field(default_factory=list)
    #: When and why a client stopped being sampled: ``(round, client, reason)``.
    stops: list[tuple[int, int, str]] = field(default_factory=list)

    def __post_init__(self):
        if not 0 < self.delta < 1:
            raise ValueError(f"ledger delta must be in (0, 1), got {self.delta}")
        for c, b in [(None, self.budget), *self.budgets.items()]:
            if b is not None and not b > 0:
                raise ValueError(f"client {c}: a privacy budget is an epsilon > 0, got {b}")
        self._recount()

    def _recount(self) -> None:
        self._zs: dict[int, Counter] = defaultdict(Counter)
        for e in self.entries:
            self._zs[e.client][e.noise_multiplier] += 1

    def restore(self, saved: PrivacyLedger) -> None:
        """Take ``saved``'s entries and stops (a resumed run's checkpoint), keeping this budget."""
        self.entries, self.stops = list(saved.entries), list(saved.stops)
        self._recount()

    # -- the account --------------------------------------------------------------------------
    def record(self, client: int, run: str, experience: int, rnd: int, noise_multiplier: float) -> None:
        self.entries.append(Participation(client, run, experience, rnd, noise_multiplier))
        self._zs[client][noise_multiplier] += 1

    def budget_of(self, client: int) -> float | None:
        return self.budgets.get(client, self.budget)

    def spent(self, client: int) -> float:
        return composed_epsilon(_history(self._zs.get(client, Counter())), self.delta)

    def participations(self, client: int) -> int:
        return sum(self._zs.get(client, Counter()).values())

    def can_take_part(self, client: int, noise_multiplier: float) -> bool:
        """Whether one more round at ``noise_multiplier`` keeps the client within its budget."""
        budget = self.budget_of(client)
        if budget is None:
            return True
        zs = Counter(self._zs.get(client, Counter()))
        zs[noise_multiplier] += 1
        return composed_epsilon(_history(zs), self.delta) <= budget

    def stop(self, rnd: int, client: int, noise_multiplier: float) -> None:
        """Record (once) that ``client`` is no longer sampled from round ``rnd`` on, and why."""
        if any(c == client for _, c, _ in self.stops):
            return
        why = (f"spent epsilon {self.spent(client):.3g} of its budget {self.budget_of(client):g}; "
               f"one more round at z={noise_multiplier:.3g} would exceed it")
        self.stops.append((rnd, client, why))

    def spent_by_client(self, clients: int) -> list[float]:
        return [self.spent(c) for c in range(clients)]

    def percentiles(self, clients: int) -> dict[str, float]:
        """min, p10, median, p90, max of every client's spent epsilon (0 for one that never took part)."""
        eps = sorted(self.spent_by_client(clients))

        def q(p: float) -> float:  # nearest rank: a value some client really has
            return eps[min(len(eps) - 1, max(0, math.ceil(p * len(eps)) - 1))]

        return {"min": eps[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": eps[-1]}

    def at_limit(self, clients: int) -> list[int]:
        return sorted({c for _, c, _ in self.stops if c < clients})

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"delta": self.delta, "budget": self.budget, "budgets": {str(k): v for k, v in self.budgets.items()},
                "entries": [[e.client, e.run, e.experience, e.round, e.noise_multiplier] for e in self.entries],
                "stops": [list(s) for s in self.stops]}

    @classmethod
    def from_json(cls, data: dict, *, budget: float | None = None, budgets: dict[int, float] | None = None,
                  delta: float | None = None) -> PrivacyLedger:
        """A saved ledger; ``budget``/``budgets``/``delta`` given here replace the saved ones (a new
        run's config). A different delta is refused: epsilons at two deltas do not add up."""
        if delta is not None and not math.isclose(delta, float(data["delta"]), rel_tol=1e-12):
            raise ValueError(f"the saved ledger accounts at delta {data['delta']:g}, this run at {delta:g}; "
                             "use the same privacy.delta to continue a ledger")
        return cls(float(data["delta"]), budget if budget is not None else data.get("budget"),
                   budgets if budgets is not None else {int(k): float(v) for k, v in data.get("budgets", {}).items()},
                   [Participation(int(c), str(r), int(e), int(n), float(z)) for c, r, e, n, z in data["entries"]],
                   [(int(r), int(c), str(why)) for r, c, why in data.get("stops", [])])

    def table(self, clients: int) -> list[dict]:
        """One row per client: participations, spent epsilon, budget, whether stopped."""
        stopped = {c: r for r, c, _ in self.stops}
        return [{"client": c, "participations": self.participations(c), "epsilon": self.spent(c),
                 "budget": self.budget_of(c), "stopped_at_round": stopped.get(c)} for c in range(clients)]


def read_budgets(path: Path, clients: int) -> dict[int, float]:
    """Per-client budgets from a ``.json`` (``{"3": 1.5, ...}``) or ``.csv`` (``client,epsilon``
    rows, a header line allowed) file; every id must be a client of the run, every budget > 0."""
    if not path.is_file():
        raise ValueError(f"privacy.client_budgets: no file {path}")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("expected an object {\"client\": epsilon}")
            pairs = list(raw.items())
        elif path.suffix == ".csv":
            rows = [r for r in csv.reader(path.read_text().splitlines()) if r and r[0].strip()]
            if rows and not rows[0][0].strip().lstrip("-").isdigit():
                rows = rows[1:]  # a header
            pairs = [(r[0], r[1]) for r in rows]
        else:
            raise ValueError("a .json or .csv file")
        budgets = {int(k): float(v) for k, v in pairs}
    except (ValueError, IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"privacy.client_budgets: {path} is not client -> epsilon pairs ({exc})") from None
    bad = sorted(k for k in budgets if not 0 <= k < clients)
    if bad:
        raise ValueError(f"privacy.client_budgets: {path} names clients {bad}, not among the run's "
                         f"{clients} (ids 0..{clients - 1})")
    low = sorted(k for k, v in budgets.items() if not v > 0)
    if low:
        raise ValueError(f"privacy.client_budgets: {path} gives clients {low} a budget <= 0; a budget is an epsilon > 0")
    return budgets
