"""Continual-learning metrics, as plain functions of accuracies (no framework).

Two views of the same learner:

* the **accuracy matrix** ``R[k][i]``: accuracy on experience ``i``'s test split after training
  on experience ``k`` — average accuracy, average forgetting (Chaudhry et al. 2018) and backward
  transfer (Lopez-Paz & Ranzato 2017);
* the **continual-evaluation trace**: accuracies on the experiences seen so far, evaluated every
  few training iterations — min-ACC, WC-ACC and windowed forgetting WF^w of De Lange et al.,
  "Continual evaluation for lifelong learning: identifying the stability gap" (ICLR 2023;
  reference code Mattdl/ContinualEvaluation). Avalanche has none of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------- accuracy matrix


def average_accuracy(matrix: np.ndarray, k: int | None = None) -> float:
    """Mean accuracy on experiences 0..k after training experience k.

    Default: the final row over all experiences (a joint learner's matrix has that one row).
    """
    matrix = np.asarray(matrix, dtype=float)
    if k is None:
        return float(matrix[-1].mean())
    return float(matrix[k, : k + 1].mean())


def average_forgetting(matrix: np.ndarray) -> float:
    """Mean over earlier experiences i of (best accuracy before the end) − (final accuracy).

    ``f_i = max_{l in [i, T-2]} R[l][i] − R[T-1][i]`` averaged over i < T−1 (0 for one experience).
    """
    matrix = np.asarray(matrix, dtype=float)
    t = matrix.shape[0]
    if t < 2:
        return 0.0
    drops = [matrix[i : t - 1, i].max() - matrix[t - 1, i] for i in range(t - 1)]
    return float(np.mean(drops))


def backward_transfer(matrix: np.ndarray) -> float:
    """``BWT = 1/(T-1) Σ_{i<T-1} (R[T-1][i] − R[i][i])``: negative when learning later experiences hurts."""
    matrix = np.asarray(matrix, dtype=float)
    t = matrix.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([matrix[t - 1, i] - matrix[i, i] for i in range(t - 1)]))


# --------------------------------------------------------------------------- continual evaluation


@dataclass
class EvalPoint:
    """One periodic evaluation: training iteration, the experience being learned, accuracies."""

    iteration: int
    experience: int
    accuracies: dict[int, float]  # experience index -> accuracy, only experiences seen so far


@dataclass
class ContinualTrace:
    """The periodic evaluations of one learner, in order."""

    points: list[EvalPoint] = field(default_factory=list)

    def add(self, iteration: int, experience: int, accuracies: dict[int, float]) -> None:
        self.points.append(EvalPoint(iteration, experience, dict(accuracies)))

    def series(self, task: int, after_task: int | None = None) -> list[float]:
        """Accuracies of ``task`` in order, from points recorded while learning experiences > after_task."""
        after = -1 if after_task is None else after_task
        return [p.accuracies[task] for p in self.points if p.experience > after and task in p.accuracies]


def _end_iteration(trace: ContinualTrace, task: int) -> int | None:
    """The iteration of the last evaluation taken while ``task`` was being learned."""
    return max((p.iteration for p in trace.points if p.experience == task), default=None)


def min_acc(trace: ContinualTrace, current: int) -> float | None:
    """min-ACC while learning experience ``current``: for each earlier experience i, its lowest
    accuracy over the evaluations after its last training iteration (``|T_i| < n <= t``; the
    pre-update point of the next experience, at ``n = |T_i|``, is not one of them), averaged over
    i < current. None before there is an earlier experience."""
    if current < 1:
        return None
    mins = []
    for i in range(current):
        end = _end_iteration(trace, i)
        if end is None:  # never learned on its own (joint training)
            continue
        s = [p.accuracies[i] for p in trace.points
             if p.iteration > end and p.experience <= current and i in p.accuracies]
        if s:
            mins.append(min(s))
    return float(np.mean(mins)) if mins else None


def wc_acc(trace: ContinualTrace, current: int) -> float | None:
    """Worst-case accuracy while learning experience ``current`` (0-based; k = current + 1):
    ``WC-ACC = (1/k) A_k + (1 − 1/k) min-ACC``, with A_k the latest accuracy on the current
    experience. For the first experience it is A_1."""
    latest = [p for p in trace.points if p.experience == current and current in p.accuracies]
    if not latest:
        return None
    a_k = latest[-1].accuracies[current]
    k = current + 1
    m = min_acc(trace, current)
    return a_k if m is None else a_k / k + (1 - 1 / k) * m


def _windowed_extreme(series: list[float], window: int, sign: float) -> float:
    """max over a < b with b − a < window of sign·(A_a − A_b), clipped at 0."""
    best = 0.0
    for b in range(1, len(series)):
        for a in range(max(0, b - window + 1), b):
            best = max(best, sign * (series[a] - series[b]))
    return best


def windowed_forgetting(trace: ContinualTrace, current: int, window: int) -> float | None:
    """WF^w: per experience, the largest drop ``A_a − A_b`` (a before b) among any ``window``
    consecutive evaluations of it, over its whole history up to experience ``current``; 0 when it
    never drops; averaged over every experience seen, the current one included — as the reference
    code (Mattdl/ContinualEvaluation, ``WindowedForgettingPluginMetric``) computes it."""
    return _windowed(trace, current, window, sign=1.0)


def windowed_plasticity(trace: ContinualTrace, current: int, window: int) -> float | None:
    """WP^w: as WF^w with the largest gain ``A_b − A_a``. (The reference code skips start points
    below an earlier maximum, which undercounts gains; this takes every pair in the window.)"""
    return _windowed(trace, current, window, sign=-1.0)


def _windowed(trace: ContinualTrace, current: int, window: int, sign: float) -> float | None:
    values = []
    for i in range(current + 1):
        series = [p.accuracies[i] for p in trace.points if p.experience <= current and i in p.accuracies]
        if series:
            values.append(_windowed_extreme(series, window, sign))
    return float(np.mean(values)) if values else None


def continual_summary(trace: ContinualTrace, current: int) -> dict[str, float]:
    """The stability-gap metrics at the end of experience ``current``, None values left out."""
    out = {
        "min_acc": min_acc(trace, current),
        "wc_acc": wc_acc(trace, current),
        "wf_10": windowed_forgetting(trace, current, 10),
        "wf_100": windowed_forgetting(trace, current, 100),
    }
    return {k: v for k, v in out.items() if v is not None}


def worst_experience_accuracy(matrix: np.ndarray) -> float:
    """The final model's accuracy on its worst experience (the last row's minimum): what a
    promotion gate reads as ``worst_exp_accuracy``."""
    return float(np.min(np.asarray(matrix, dtype=float)[-1]))


def matrix_summary(matrix: np.ndarray) -> dict[str, float]:
    """Headline numbers of an accuracy matrix; forgetting and BWT need one row per experience."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape[0] != matrix.shape[1]:
        return {"avg_accuracy": average_accuracy(matrix)}
    return {
        "avg_accuracy": average_accuracy(matrix),
        "avg_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }
