"""A fleet of federated clients on a virtual clock: who is online when, how fast, and which
experience each has reached.

Everything is drawn once from the run's seed (``numpy.random.default_rng([seed, ...])``), so the
same config and seed give the same fleet on any machine; times are virtual hours.

* **Speed**: log-normal with median 1 and ``speed_sigma`` (heavy-tailed compute times: a local
  round takes ``round_minutes / speed``; with sigma 1 the slowest tenth of clients take about
  3.6 times the median, the slowest hundredth about 10 times).
* **Availability**: ``always``; ``markov``, a two-state chain whose on and off periods are
  exponential with means ``on_hours`` / ``off_hours``, each client starting in its stationary state;
  ``daily``, ``on_hours`` a day from a random hour per client (devices charging overnight); or
  ``trace``, the on-intervals of a CSV file ``client,start_hour,end_hour``.
* **Arrivals**: experience ``k`` reaches client ``i`` at ``t_ik = k * experience_hours + d_ik``,
  ``d_ik`` exponential with mean ``arrival_spread_hours``, never before its previous experience.
* **Drop-outs**: a started round is abandoned with probability ``dropout`` (drawn by the event
  loop, ``flows/virtual_clock.py``), or when the client goes offline before it finishes.

Plain numpy; no Flower, Prefect or MLflow.
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FleetError(ValueError):
    """A fleet that cannot be built as configured; the message names the key."""


@dataclass
class Fleet:
    speeds: np.ndarray  # (clients,)
    #: Per client, its sorted, disjoint on-intervals [start, end) in hours within [0, horizon].
    windows: list[list[tuple[float, float]]]
    arrivals: np.ndarray  # (clients, experiences): the hour experience k reaches client i
    round_hours: float
    _flat: tuple | None = None  # every on-interval as (owner, start, end) arrays, built on first use

    @property
    def clients(self) -> int:
        return len(self.speeds)

    def duration(self, client: int) -> float:
        """Virtual hours one local round takes on ``client``."""
        return self.round_hours / float(self.speeds[client])

    def _window(self, client: int, t: float) -> tuple[float, float] | None:
        w = self.windows[client]
        i = bisect.bisect_right(w, (t, math.inf)) - 1
        return w[i] if i >= 0 and w[i][0] <= t < w[i][1] else None

    def online(self, client: int, t: float) -> bool:
        return self._window(client, t) is not None

    def online_until(self, client: int, t: float) -> float:
        """When ``client``, online at ``t``, goes offline (``t`` if it is offline)."""
        w = self._window(client, t)
        return w[1] if w is not None else t

    def next_online(self, client: int, t: float) -> float | None:
        """The first time >= ``t`` at which ``client`` is online (None: never again)."""
        if self.online(client, t):
            return t
        for start, _ in self.windows[client]:
            if start >= t:
                return start
        return None

    def experience_at(self, client: int, t: float) -> int:
        """The newest experience whose data ``client`` has at ``t`` (-1: none yet)."""
        return int(np.searchsorted(self.arrivals[client], t, side="right")) - 1

    def ready(self, client: int, t: float) -> bool:
        return self.online(client, t) and self.experience_at(client, t) >= 0

    def next_ready(self, client: int, t: float) -> float | None:
        """The first time >= ``t`` at which ``client`` is online with data (None: never)."""
        t = max(t, float(self.arrivals[client, 0]))
        return self.next_online(client, t)

    def ready_clients(self, t: float) -> np.ndarray:
        """Every client online with data at ``t``, in id order: one vectorised pass over all
        on-intervals (the event loop asks this at every start; at 1,000 clients a loop over
        :meth:`ready` was the clock's largest cost)."""
        if self._flat is None:
            owner = [c for c, w in enumerate(self.windows) for _ in w]
            bounds = np.array([b for w in self.windows for b in w], dtype=float).reshape(-1, 2)
            self._flat = (np.array(owner, dtype=int), bounds[:, 0], bounds[:, 1])
        owner, starts, ends = self._flat
        online = np.zeros(self.clients, dtype=bool)
        online[owner[(starts <= t) & (t < ends)]] = True
        return np.flatnonzero(online & (self.arrivals[:, 0] <= t))

    def online_fraction(self, horizon: float) -> float:
        return float(np.mean([sum(e - s for s, e in w) / horizon for w in self.windows]))


def build_fleet(clock, clients: int, experiences: int, seed: int) -> Fleet:
    """The fleet of ``clients`` for a ``[clock]`` config section."""
    horizon = clock.hours
    rng = np.random.default_rng([seed, 0xF1EE7])
    speeds = np.exp(rng.normal(0.0, clock.speed_sigma, clients))
    if clock.availability == "always":
        windows = [[(0.0, horizon)] for _ in range(clients)]
    elif clock.availability == "markov":
        windows = [_markov(rng, clock.on_hours, clock.off_hours, horizon) for _ in range(clients)]
    elif clock.availability == "daily":
        windows = [_daily(rng.uniform(0, 24), clock.on_hours, horizon) for _ in range(clients)]
    else:
        windows = read_trace(Path(clock.trace), clients, horizon)
    delays = rng.exponential(clock.arrival_spread_hours, (clients, experiences)) if clock.arrival_spread_hours \
        else np.zeros((clients, experiences))
    arrivals = np.maximum.accumulate(np.arange(experiences) * clock.experience_hours + delays, axis=1)
    return Fleet(speeds, windows, arrivals, clock.round_minutes / 60)


def _markov(rng: np.random.Generator, on: float, off: float, horizon: float) -> list[tuple[float, float]]:
    state_on = rng.random() < on / (on + off)  # the chain's stationary distribution
    t, windows = 0.0, []
    while t < horizon:
        length = rng.exponential(on if state_on else off)
        if state_on:
            windows.append((t, min(t + length, horizon)))
        t += length
        state_on = not state_on
    return windows


def _daily(phase: float, on: float, horizon: float) -> list[tuple[float, float]]:
    if on >= 24:
        return [(0.0, horizon)]
    windows, day = [], -1
    while day * 24 < horizon:
        start, end = day * 24 + phase, day * 24 + phase + on
        if end > 0 and start < horizon:
            windows.append((max(start, 0.0), min(end, horizon)))
        day += 1
    return windows


def read_trace(path: Path, clients: int, horizon: float) -> list[list[tuple[float, float]]]:
    """On-intervals from a CSV ``client,start_hour,end_hour`` (a header line allowed); a client
    the file does not name is never online."""
    if not path.is_file():
        raise FleetError(f"clock.trace: no file {path}")
    windows: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    for n, row in enumerate(csv.reader(path.read_text().splitlines()), 1):
        if not row or not row[0].strip() or (n == 1 and not row[0].strip().lstrip("-").isdigit()):
            continue
        try:
            client, start, end = int(row[0]), float(row[1]), float(row[2])
        except (ValueError, IndexError):
            raise FleetError(f"clock.trace: {path} line {n}: expected client,start_hour,end_hour, got {row}") from None
        if not 0 <= client < clients:
            raise FleetError(f"clock.trace: {path} line {n}: client {client} is not one of the run's {clients} "
                             f"(ids 0..{clients - 1})")
        if start < 0 or end <= start:
            raise FleetError(f"clock.trace: {path} line {n}: an interval needs 0 <= start < end, got {start}, {end}")
        if start < horizon:
            windows[client].append((start, min(end, horizon)))
    return [_merge(sorted(w)) for w in windows]


def _merge(windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in windows:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged
