"""Comparing learners over seeds: 95% intervals and a verdict rule fixed in advance.

A claim "A beats B on metric m" is judged on the per-seed differences ``A_s - B_s`` (paired: both
learners see seed s's stream, split and initial weights): their mean's two-sided 95% Student-t
interval. The rule, stated before any result is seen:

- **reproduced** — the interval lies wholly on the claimed side of zero;
- **contradicted** — it lies wholly on the other side;
- **not shown at this scale** — it contains zero.

With fewer than 2 seeds there is no interval, and a sweep refuses to start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

REPRODUCED, CONTRADICTED, NOT_SHOWN = "reproduced", "contradicted", "not shown at this scale"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def interval95(values: Sequence[float]) -> Interval:
    """The mean of ``values`` and its two-sided 95% Student-t interval (n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        raise ValueError(f"a 95% interval needs at least 2 values, got {len(x)}")
    mean, sem = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(len(x))
    half = float(stats.t.ppf(0.975, len(x) - 1)) * sem
    return Interval(mean, mean - half, mean + half, len(x))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """The 95% interval of the mean per-seed difference ``a - b``."""
    if len(a) != len(b):
        raise ValueError(f"paired values: {len(a)} against {len(b)} seeds")
    return interval95(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


def verdict(difference: Interval, direction: Literal["higher", "lower"]) -> str:
    """The rule above, for a claim that the difference is ``higher`` (or ``lower``) than zero."""
    sign = 1 if direction == "higher" else -1
    low, high = sorted((sign * difference.low, sign * difference.high))
    if low > 0:
        return REPRODUCED
    if high < 0:
        return CONTRADICTED
    return NOT_SHOWN
