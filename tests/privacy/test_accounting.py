"""privacy/accounting.py: PLD epsilon against independent references, calibration, refusals."""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from scipy import optimize
from scipy.stats import norm

from lifelong.privacy.accounting import (
    PrivacyBudgetError,
    UserLevelPrivacy,
    calibrate_noise,
    check_budget,
    epsilon,
    epsilon_per_round,
    sample_rate,
)

# --------------------------------------------------------------------------- independent references


def exact_gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Without subsampling, T Gaussian rounds are one Gaussian mechanism with mu = sqrt(T)/z, whose
    exact delta(eps) is Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang, ICML 2018)."""
    mu = math.sqrt(rounds) / noise_multiplier

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0.0, 500.0, xtol=1e-10)


@pytest.mark.parametrize("z, rounds, delta", [(1.0, 1, 1e-5), (5.0, 10, 1e-5), (20.0, 100, 1e-9)])
def test_full_participation_matches_the_analytic_gaussian(z, rounds, delta):
    exact = exact_gaussian_epsilon(z, rounds, delta)
    got = epsilon(z, 1.0, rounds, delta)
    assert got == pytest.approx(exact, rel=2e-3)
    assert got >= exact - 1e-9  # pessimistic PLD: an upper bound


def test_subsampled_matches_rdp_and_opacus_prv():
    z, q, rounds, delta = 1.0, 0.01, 1000, 1e-5
    got = epsilon(z, q, rounds, delta)
    rdp = RdpAccountant()
    rdp.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)),
                                             rounds))
    rdp_eps = rdp.get_epsilon(delta)
    assert got < rdp_eps < 1.3 * got  # RDP is a looser upper bound of the same mechanism
    from opacus.accountants import PRVAccountant  # an independent implementation (Gopi et al. 2021)

    prv = PRVAccountant()
    prv.history = [(z, q, rounds)]
    assert got == pytest.approx(prv.get_epsilon(delta), rel=0.02)
    assert got == pytest.approx(1.829, abs=2e-3)  # this setting's value, pinned


def test_epsilon_edges_and_monotonicity():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(1.0, 0.0, 10, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert epsilon(1.0, 0.1, 10, 1e-5) < epsilon(1.0, 0.1, 20, 1e-5)
    assert epsilon(2.0, 0.1, 10, 1e-5) < epsilon(1.0, 0.1, 10, 1e-5)
    assert epsilon(1.0, 0.05, 10, 1e-5) < epsilon(1.0, 0.1, 10, 1e-5)


def test_epsilon_after_each_round_ends_at_the_run_epsilon():
    z, q, rounds, delta = 1.0, 0.05, 30, 1e-5
    series = list(epsilon_per_round(z, q, rounds, delta))
    assert len(series) == rounds
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(series))
    assert series[-1] == pytest.approx(epsilon(z, q, rounds, delta), rel=1e-9)
    assert series[9] == pytest.approx(epsilon(z, q, 10, delta), rel=1e-9)


# --------------------------------------------------------------------------- calibration and refusals


@pytest.mark.parametrize("target, q, rounds, delta", [(2.0, 0.01, 1000, 1e-5), (8.0, 0.1, 50, 1e-6)])
def test_calibrate_then_epsilon_round_trip(target, q, rounds, delta):
    z = calibrate_noise(target, q, rounds, delta)
    eps = epsilon(z, q, rounds, delta)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)  # and not much more noise than needed
    assert epsilon(z * 0.98, q, rounds, delta) > target


def test_unreachable_target_is_refused_with_the_numbers():
    with pytest.raises(PrivacyBudgetError) as err:
        calibrate_noise(0.01, 1.0, 1000, 1e-5)
    msg = str(err.value)
    assert "unreachable" in msg and "0.01" in msg and "1000 rounds" in msg and "100" in msg
    with pytest.raises(PrivacyBudgetError, match="exceeds the privacy budget"):
        check_budget(0.5, 0.1, 100, 1e-5, max_epsilon=1.0)
    assert check_budget(5.0, 0.01, 10, 1e-5, max_epsilon=1.0) < 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"target_epsilon": 1.0, "sample_rate": 0.1, "rounds": 10, "delta": 0.0}, "delta"),
    ({"target_epsilon": 1.0, "sample_rate": 0.1, "rounds": 10, "delta": 1.0}, "delta"),
    ({"target_epsilon": 1.0, "sample_rate": 1.5, "rounds": 10, "delta": 1e-5}, "sample rate"),
    ({"target_epsilon": 1.0, "sample_rate": 0.0, "rounds": 10, "delta": 1e-5}, "sample rate 0"),
    ({"target_epsilon": 0.0, "sample_rate": 0.1, "rounds": 10, "delta": 1e-5}, "target epsilon"),
    ({"target_epsilon": 1.0, "sample_rate": 0.1, "rounds": 0, "delta": 1e-5}, "rounds"),
])
def test_invalid_inputs_are_refused(kwargs, match):
    with pytest.raises(PrivacyBudgetError, match=match):
        calibrate_noise(**kwargs)


def test_sample_rate_checks():
    assert sample_rate(10, 1000) == 0.01
    with pytest.raises(PrivacyBudgetError, match="exceeds"):
        sample_rate(20, 10)
    assert issubclass(PrivacyBudgetError, ValueError)


# --------------------------------------------------------------------------- the paper's larger-population trick


def test_simulated_population_accounting():
    p = UserLevelPrivacy(noise_multiplier=1.0, cohort_size=10, population=200, rounds=20, delta=1e-4)
    assert not p.extrapolated and p.sample_rate == 0.05
    assert p.epsilon() == epsilon(1.0, 0.05, 20, 1e-4)
    assert "population of 200 users" in p.describe() and "EXTRAPOLATED" not in p.describe()
    with pytest.raises(PrivacyBudgetError, match="1/population"):
        UserLevelPrivacy(noise_multiplier=1.0, cohort_size=10, population=200, rounds=20, delta=0.01)


def test_a_noise_multiplier_too_small_to_account_is_refused_at_once():
    # z = 0.01 once took 12 minutes and 13 GB in the PLD before any round ran; now it is refused.
    with pytest.raises(PrivacyBudgetError, match="below 0.05: the guarantee would be meaningless"):
        UserLevelPrivacy(noise_multiplier=0.01, cohort_size=5, population=10, rounds=10, delta=1e-3)
    assert epsilon(0.0, 0.5, 10, 1e-3) == math.inf  # clipping without noise stays allowed


def test_extrapolated_population_keeps_the_noise_on_the_average():
    c = 0.5
    p = UserLevelPrivacy(noise_multiplier=0.002, cohort_size=50, population=1000, rounds=100, delta=1e-9,
                         stated_population=10_000_000, stated_cohort_size=20_000)
    # the same noise std on the cohort average: z C / S in simulation = z' C / S' in deployment
    assert p.noise_multiplier * c / 50 == pytest.approx(p.accounted_noise_multiplier * c / 20_000)
    assert p.accounted_noise_multiplier == pytest.approx(0.8)
    assert p.sample_rate == pytest.approx(0.002)
    assert p.epsilon() == epsilon(0.8, 0.002, 100, 1e-9)
    text = p.describe()
    assert "population of 10000000 users" in text and "EXTRAPOLATED" in text and "50 of 1000" in text
    # only the population stated: same cohort and noise multiplier, q with the stated population
    q_only = UserLevelPrivacy(1.0, 50, 1000, 10, 1e-9, stated_population=1_000_000)
    assert q_only.accounted_noise_multiplier == 1.0 and q_only.sample_rate == pytest.approx(5e-5)


def test_target_epsilon_calibrates_for_the_stated_population_and_scales_to_the_simulation():
    p = UserLevelPrivacy.from_target_epsilon(4.5, cohort_size=16, population=100, rounds=200, delta=1e-9,
                                             stated_population=1_000_000, stated_cohort_size=5_000)
    assert p.epsilon() <= 4.5 and p.epsilon() == pytest.approx(4.5, rel=0.01)
    assert p.noise_multiplier == pytest.approx(p.accounted_noise_multiplier * 16 / 5_000)
    with pytest.raises(PrivacyBudgetError, match="unreachable"):
        UserLevelPrivacy.from_target_epsilon(0.01, cohort_size=10, population=20, rounds=500, delta=1e-5)
