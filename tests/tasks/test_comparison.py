"""tasks/comparison.py: 95% intervals by hand and the verdict rule."""

import math

import pytest

from lifelong.tasks.comparison import (
    CONTRADICTED,
    NOT_SHOWN,
    REPRODUCED,
    interval95,
    paired_difference,
    verdict,
)


def test_interval_by_hand():
    # values 1, 2, 3: mean 2, sample std 1, sem 1/sqrt(3); t(0.975, 2) = 4.302652729911275
    i = interval95([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (i.mean, i.low, i.high, i.n) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    # five seeds: t(0.975, 4) = 2.7764451051977987
    j = interval95([0.1, 0.2, 0.3, 0.4, 0.5])
    assert j.high - j.mean == pytest.approx(2.7764451051977987 * math.sqrt(0.025) / math.sqrt(5))


def test_fewer_than_two_values_have_no_interval():
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        interval95([0.5])


def test_paired_differences_and_the_rule():
    better = paired_difference([0.80, 0.82, 0.81], [0.70, 0.71, 0.69])
    assert better.mean == pytest.approx(0.11) and verdict(better, "higher") == REPRODUCED
    assert verdict(better, "lower") == CONTRADICTED
    noisy = paired_difference([0.80, 0.60, 0.75], [0.70, 0.72, 0.69])
    assert noisy.low < 0 < noisy.high and verdict(noisy, "higher") == NOT_SHOWN
    forgetting = paired_difference([0.10, 0.12, 0.11], [0.30, 0.31, 0.29])  # lower is the claim
    assert verdict(forgetting, "lower") == REPRODUCED
    with pytest.raises(ValueError, match="3 against 2 seeds"):
        paired_difference([1, 2, 3], [1, 2])
