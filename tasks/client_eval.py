"""Per-client continual evaluation: how every client of a federation, not just the pooled test
set, keeps what it learned.

After each experience the global model is evaluated once on the test split of every experience
seen so far; each client's accuracy is then read off the samples of its own test share
(``tasks/partition.client_test_indices``: the classes it trained on, in its mix). One pass of the
model serves every client, so the cost is the global evaluation's whatever the population.

A client's row after experience ``e`` holds its accuracy on each experience (NaN where its share
of that experience is empty — under label skew a client may hold no sample of a task). From the
rows come its *seen accuracy* (mean over experiences ``0..e`` it holds data of) and, at the end,
its *forgetting*: per experience ``j`` before the last, the best accuracy it had on ``j`` after
learning it minus the final one (Chaudhry et al. 2018's definition, per client), averaged over
the ``j`` it holds. The spread across clients (mean, p10, p50, p90, worst, std) is what a fleet
operator reads: a mean can hide clients the model has forgotten entirely.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lifelong.tasks.partition import client_test_indices


@dataclass(frozen=True)
class ShareIndex:
    """The clients' disjoint index shares of one test split, flattened once, so that every
    client's accuracy is one ``bincount`` — a population's 10^5 clients in milliseconds, where a
    loop over the shares took a tenth of a second each time."""

    indices: np.ndarray  # every share's indices, client after client
    owner: np.ndarray  # the client of each of them
    sizes: np.ndarray  # each client's share size

    @classmethod
    def of(cls, shares: list[torch.Tensor]) -> ShareIndex:
        sizes = np.fromiter((len(s) for s in shares), dtype=np.int64, count=len(shares))
        nonempty = [shares[i] for i in np.flatnonzero(sizes)]
        indices = torch.cat(nonempty).numpy() if nonempty else np.zeros(0, dtype=np.int64)
        return cls(indices, np.repeat(np.arange(len(shares)), sizes), sizes)

    def accuracies(self, correct: torch.Tensor) -> np.ndarray:
        hits = np.bincount(self.owner, weights=correct.numpy()[self.indices].astype(np.float64),
                           minlength=len(self.sizes))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sizes > 0, hits / self.sizes, np.nan)


class TestShares:
    """Each experience's ``ShareIndex`` of the clients' test shares, built on first use: what a
    flow that evaluates every client keeps for its run."""

    def __init__(self, cfg, stream):
        self.cfg, self.stream, self._built = cfg, stream, {}

    def __getitem__(self, experience: int) -> ShareIndex:
        if experience not in self._built:
            self._built[experience] = ShareIndex.of(client_test_indices(self.cfg, self.stream, experience))
        return self._built[experience]


def client_accuracies(correct: torch.Tensor, shares: list[torch.Tensor] | ShareIndex) -> np.ndarray:
    """Each client's accuracy from a test split's per-sample ``correct`` flags and the clients'
    index shares of that split (NaN for an empty share)."""
    index = shares if isinstance(shares, ShareIndex) else ShareIndex.of(shares)
    return index.accuracies(correct)


def seen_accuracy(row: np.ndarray, experience: int) -> np.ndarray:
    """Each client's mean accuracy over experiences ``0..experience`` (``row``: clients × experiences)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a client with no data seen yet: NaN
        return np.nanmean(row[:, : experience + 1], axis=1)


def reached_accuracy(row: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Each client's mean accuracy over the experiences it has reached (``reached[c]``: its
    newest; -1, none: NaN). ``row``: clients × experiences."""
    mask = np.arange(row.shape[1])[None, :] <= np.asarray(reached)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a client with no data reached: NaN
        return np.nanmean(np.where(mask, row, np.nan), axis=1)


def personal_summary(personal: list[list[float]], global_own: np.ndarray) -> dict[str, float]:
    """Clients' personalised (locally trained) models: ``personal[i]``, client i's accuracy on its
    own test share of each experience it had seen; ``global_own[i]``, the global model's on the same
    client. The spread of their means (``personal_acc_*``), how many had one
    (``personal_evaluated``), and the mean gain over the global model (``personal_gain_mean``);
    nothing when no client has a finite figure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a client with no test data: NaN
        mine = np.array([np.nanmean(p) if len(p) else np.nan for p in personal])
    keep = np.isfinite(mine)
    if not keep.any():
        return {}
    values = {f"personal_acc_{k}": v for k, v in spread(mine[keep]).items()}
    values["personal_evaluated"] = int(keep.sum())
    both = keep & np.isfinite(global_own)
    if both.any():
        values["personal_gain_mean"] = float(np.mean(mine[both] - global_own[both]))
    return values


def client_forgetting(rows: list[np.ndarray]) -> np.ndarray:
    """Each client's average forgetting over the experiences before the last (``rows[e]``: the
    clients × experiences accuracies after experience ``e``); NaN for a client with none."""
    stacked = np.stack(rows)  # after-experience × clients × experiences
    last = len(rows) - 1
    if last == 0:
        return np.full(stacked.shape[1], np.nan)
    drops = np.full((stacked.shape[1], last), np.nan)
    for j in range(last):
        best = np.nanmax(np.where(np.isnan(stacked[j:last, :, j]), -np.inf, stacked[j:last, :, j]), axis=0)
        drop = best - stacked[last, :, j]
        drops[:, j] = np.where(np.isfinite(drop), drop, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(drops, axis=1)


def spread(values: np.ndarray, worst: str = "min") -> dict[str, float]:
    """Mean, p10, p50, p90, the worst client and the std across clients (NaNs left out).
    ``worst``: ``min`` for accuracies, ``max`` for forgetting."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return {}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"mean": float(v.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90),
            "worst": float(v.min() if worst == "min" else v.max()), "std": float(v.std())}


def matrix_table(rows: list[np.ndarray], shares: list[list[int]]) -> dict:
    """The per-client matrices as one table (``{"columns", "data"}``; ``pandas.DataFrame(t["data"],
    columns=t["columns"])``): a line per client, experience trained and experience evaluated."""
    data = []
    for after, row in enumerate(rows):  # the evaluated cells only (a population's panel of 10^5 clients)
        clients, exps = np.nonzero(~np.isnan(row))
        data.extend([int(c), after, int(e), float(row[c, e]), shares[e][c]] for c, e in zip(clients, exps))
    return {"columns": ["client", "after_experience", "experience", "accuracy", "test_samples"], "data": data}


def rows_from_table(table: dict) -> list[np.ndarray]:
    """The rows back from ``matrix_table``'s table (what ``lifelong results`` reads from MLflow)."""
    cols = {c: i for i, c in enumerate(table["columns"])}
    data = table["data"]
    n_clients = 1 + max(line[cols["client"]] for line in data)
    n_rows = 1 + max(line[cols["after_experience"]] for line in data)
    n_exp = 1 + max(line[cols["experience"]] for line in data)
    rows = [np.full((n_clients, n_exp), np.nan) for _ in range(n_rows)]
    for line in data:
        rows[line[cols["after_experience"]]][line[cols["client"]], line[cols["experience"]]] = line[cols["accuracy"]]
    return rows


def worst_clients(rows: list[np.ndarray], k: int = 5) -> list[tuple[int, float, float]]:
    """The ``k`` clients with the lowest final seen accuracy: (client, accuracy, forgetting)."""
    final = seen_accuracy(rows[-1], len(rows) - 1)
    forgetting = client_forgetting(rows)
    order = [c for c in np.argsort(np.where(np.isnan(final), np.inf, final), kind="stable") if not np.isnan(final[c])]
    return [(int(c), float(final[c]), float(forgetting[c])) for c in order[:k]]
