"""User-level (epsilon, delta) of federated rounds: the Poisson-subsampled Gaussian mechanism, composed.

Each round samples clients with rate ``q = cohort / population``, every sampled client's update is
clipped to C (``privacy/clipping.py``), and ``N(0, (z C)^2)`` is added once to the sum: one
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per round, add-or-remove-one-*user* adjacency.
Accounted with Google's ``dp_accounting`` privacy-loss-distribution accountant (``PLDAccountant``;
Meiser & Mohammadi 2018, Doroshenko et al. 2022, connect-the-dots, pessimistic rounding so the
epsilon is an upper bound), the accountant apple/pfl-research uses (``pfl/privacy/
privacy_accountant.py``, ``PLDPrivacyAccountant``). Fixed-size cohorts are accounted as Poisson
sampling at the same rate, as pfl-research, Flower and McMahan et al. (ICLR 2018) do.

Larger population than simulated — the trick of Pelikan et al. (arXiv 2310.00098, reference code
apple-aiml-research/ml-pfl4asr; pfl-research's ``noise_cohort_size``): what matters for the model
is the noise on the cohort *average*, ``z C / S``. A deployment with cohort ``S'`` drawn from a
population ``N'`` and noise multiplier ``z'`` adds the same noise to the average as the simulation
(cohort ``S``, multiplier ``z``) when ``z = z' S / S'``. So the simulation trains with
``z = z' S / S'`` ("noise scaled to the simulated cohort") and reports the epsilon of
``(z', q' = S'/N')`` — an epsilon for the *stated* population, valid only if the model is trained
that way there. :class:`UserLevelPrivacy` keeps both and says in :meth:`UserLevelPrivacy.describe`
which population an epsilon is for.

Adaptive clipping (Andrew et al. 2021) releases a noised clipped-count each round besides the
update; by their Theorem 1 the pair costs one Gaussian mechanism with multiplier ``z`` when the
update gets ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. So the accountant keeps accounting ``z``
and the server noises the update with :attr:`UserLevelPrivacy.update_noise_multiplier`.

Plain Python + dp_accounting; no Flower, Prefect or MLflow here.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib

#: PLD grid step. dp_accounting's default is 1e-4; 1e-3 changes epsilon in the 4th significant
#: digit (still an upper bound: rounding is pessimistic) at 10-20x less time, which keeps
#: calibration (a root search) and per-round logging cheap. Pass 1e-4 for a final report.
VALUE_DISCRETIZATION_INTERVAL = 1e-3
#: Search range for calibration: no useful federated run needs more noise than this.
MAX_NOISE_MULTIPLIER = 100.0
#: Below this (accounted) z the guarantee is meaningless (epsilon ~1,900 at z = 0.05, q = 0.5, 10
#: rounds) and the PLD's grid grows as 1/z²: z = 0.05 takes 15 s and 0.7 GB, z = 0.01 minutes and
#: 13 GB (measured). It is refused instead; z = 0 (clipping without noise, epsilon inf) stays allowed.
MIN_NOISE_MULTIPLIER = 0.05


class PrivacyBudgetError(ValueError):
    """A privacy budget that cannot be met or was given invalid numbers; the message has them."""


# ----------------------------------------------------------------------------- core functions


def sample_rate(cohort_size: int, population: int) -> float:
    """``q = cohort / population``, checked."""
    if population <= 0 or cohort_size <= 0:
        raise PrivacyBudgetError(f"cohort size ({cohort_size}) and population ({population}) must be > 0")
    if cohort_size > population:
        raise PrivacyBudgetError(f"cohort size {cohort_size} exceeds the population {population}")
    return cohort_size / population


def round_event(noise_multiplier: float, sample_rate: float) -> dp_event.DpEvent:
    """One federated round: Poisson-sampled clients, Gaussian noise with multiplier z on the sum."""
    return dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """User-level epsilon at ``delta`` after ``rounds`` rounds (PLD accountant; ``inf`` if z = 0).

    The epsilon is for the population behind ``sample_rate``: pass ``q = S'/N'`` and ``z'`` of the
    stated population to get the paper's extrapolated number (see :class:`UserLevelPrivacy`).
    """
    _check(noise_multiplier, sample_rate, rounds, delta)
    if rounds == 0 or sample_rate == 0:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=value_discretization_interval)
    acc.compose(dp_event.SelfComposedDpEvent(round_event(noise_multiplier, sample_rate), int(rounds)))
    return float(acc.get_epsilon(delta))


def epsilon_per_round(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> Iterator[float]:
    """Epsilon after round 1, 2, ..., ``rounds``, lazily (one per round, for logging as rounds end).

    Builds the one-round PLD once — the same ``from_gaussian_mechanism`` call ``PLDAccountant``
    makes for this event — and self-composes it t times for round t, which is much cheaper than
    composing into one growing accountant round after round.
    """
    _check(noise_multiplier, sample_rate, rounds, delta)
    if sample_rate == 0:
        for _ in range(rounds):
            yield 0.0
        return
    if noise_multiplier == 0:
        for _ in range(rounds):
            yield math.inf
        return
    one_round = pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sampling_prob=sample_rate,
        value_discretization_interval=value_discretization_interval,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    for t in range(1, rounds + 1):
        yield float(one_round.self_compose(t).get_epsilon_for_delta(delta))


def calibrate_noise(
    target_epsilon: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    tol: float = 1e-4,
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Smallest noise multiplier (within ``tol``) whose epsilon after ``rounds`` is ``<= target``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, which re-checks the returned
    value stays within budget) on a bracket found here. Raises :class:`PrivacyBudgetError` with
    the numbers when the target cannot be reached with ``z <= max_noise_multiplier``, or the
    inputs are invalid. Returns at least ``MIN_NOISE_MULTIPLIER`` (below it the search stops:
    an easily met budget needs no finer answer).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyBudgetError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    _check(1.0, sample_rate, rounds, delta)
    if rounds < 1:
        raise PrivacyBudgetError(f"rounds must be >= 1 to calibrate noise, got {rounds}")
    if sample_rate == 0:
        raise PrivacyBudgetError("sample rate 0: no client is ever sampled, nothing to calibrate")

    @functools.cache
    def eps(z: float) -> float:
        return epsilon(z, sample_rate, rounds, delta, value_discretization_interval)

    best = eps(max_noise_multiplier)
    if best > target_epsilon:
        raise PrivacyBudgetError(
            f"target epsilon {target_epsilon:g} is unreachable: even noise multiplier "
            f"{max_noise_multiplier:g} gives epsilon {best:.4g} at delta {delta:g} after {rounds} "
            f"rounds with sample rate {sample_rate:.4g}. Fewer rounds, a smaller sample rate (a larger "
            f"population or smaller cohort), a larger delta or a larger target would fit.")
    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), walking by factors of 2 from z = 1.
    hi = min(1.0, max_noise_multiplier)
    if eps(hi) > target_epsilon:
        lo = hi
        while eps(hi) > target_epsilon:
            lo, hi = hi, min(2 * hi, max_noise_multiplier)
    else:
        lo = hi / 2
        while eps(lo) <= target_epsilon:
            if lo <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            lo, hi = max(lo / 2, MIN_NOISE_MULTIPLIER), lo
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: PLDAccountant(value_discretization_interval=value_discretization_interval),
        lambda z: dp_event.SelfComposedDpEvent(round_event(z, sample_rate), rounds),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=tol,
    )
    if z is None:  # brentq did not converge: fall back to the end known to fit
        return float(hi)
    return float(z)


def check_budget(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                 max_epsilon: float,
                 value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL) -> float:
    """Epsilon of the planned run, or :class:`PrivacyBudgetError` if it would exceed ``max_epsilon``.

    For refusing a run up front, before any client trains.
    """
    eps = epsilon(noise_multiplier, sample_rate, rounds, delta, value_discretization_interval)
    if eps > max_epsilon:
        raise PrivacyBudgetError(
            f"planned run exceeds the privacy budget: noise multiplier {noise_multiplier:g}, sample rate "
            f"{sample_rate:.4g}, {rounds} rounds give epsilon {eps:.4g} > {max_epsilon:g} at delta {delta:g}")
    return eps


# ----------------------------------------------------------------------------- the paper's trick


@dataclass(frozen=True)
class UserLevelPrivacy:
    """User-level DP of a federated run, with the simulated and the stated (accounted) population.

    ``noise_multiplier`` z is what the simulation applies: noise std ``z C`` on the sum of the
    simulated cohort of ``cohort_size`` clients out of ``population``. Without
    ``stated_population`` the epsilon is for the simulated population. With it (the paper's
    extrapolation), the epsilon is for a deployment drawing ``stated_cohort_size`` clients
    (default: ``cohort_size``) from ``stated_population`` with multiplier
    ``z' = z * stated_cohort_size / cohort_size`` — the same noise on the average. ``delta`` must
    be below 1 / (the population the epsilon is for), or one user could be exposed outright.

    ``count_noise_std`` (sigma_b, on the simulated cohort's count): adaptive clipping's share of
    the budget; the epsilon stays that of z, and the update is noised with
    :attr:`update_noise_multiplier` instead (refused unless ``2 sigma_b > z``).
    """

    noise_multiplier: float
    cohort_size: int
    population: int
    rounds: int
    delta: float
    stated_population: int | None = None
    stated_cohort_size: int | None = None
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL
    count_noise_std: float | None = None

    def __post_init__(self):
        sample_rate(self.cohort_size, self.population)
        if self.stated_cohort_size is not None and self.stated_population is None:
            raise PrivacyBudgetError("stated_cohort_size needs stated_population")
        sample_rate(self.accounted_cohort_size, self.accounted_population)
        _check(self.noise_multiplier, 0.0, self.rounds, self.delta, floor=False)  # the simulated z: any >= 0
        _check(self.accounted_noise_multiplier, self.sample_rate, self.rounds, self.delta)
        if self.delta >= 1 / self.accounted_population:
            raise PrivacyBudgetError(
                f"delta {self.delta:g} >= 1/population = 1/{self.accounted_population}: a mechanism that "
                "publishes one random user's data outright would satisfy it; use delta << 1/population")
        if self.count_noise_std is not None:
            _ = self.update_noise_multiplier  # refuses a sigma_b too small for z, before the run

    @classmethod
    def from_target_epsilon(cls, target_epsilon: float, *, cohort_size: int, population: int, rounds: int,
                            delta: float, stated_population: int | None = None,
                            stated_cohort_size: int | None = None,
                            max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
                            value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
                            count_noise_std: float | None = None) -> UserLevelPrivacy:
        """Calibrate z before the run so the accounted epsilon after ``rounds`` is ``<= target``.

        The calibration is for the accounted (stated) population; the returned object's
        ``noise_multiplier`` is scaled to the simulated cohort. ``max_noise_multiplier`` bounds the
        accounted multiplier.
        """
        probe = cls(1.0, cohort_size, population, rounds, delta, stated_population, stated_cohort_size,
                    value_discretization_interval)
        z_acc = calibrate_noise(target_epsilon, probe.sample_rate, rounds, delta, max_noise_multiplier,
                                value_discretization_interval=value_discretization_interval)
        z_sim = z_acc * cohort_size / probe.accounted_cohort_size
        return cls(z_sim, cohort_size, population, rounds, delta, stated_population, stated_cohort_size,
                   value_discretization_interval, count_noise_std)

    @property
    def extrapolated(self) -> bool:
        return self.stated_population is not None

    @property
    def accounted_population(self) -> int:
        return self.stated_population if self.stated_population is not None else self.population

    @property
    def accounted_cohort_size(self) -> int:
        if self.stated_population is None:
            return self.cohort_size
        return self.stated_cohort_size if self.stated_cohort_size is not None else self.cohort_size

    @property
    def accounted_noise_multiplier(self) -> float:
        """z' of the accounted deployment: same noise on the cohort average as the simulation."""
        return self.noise_multiplier * self.accounted_cohort_size / self.cohort_size

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier the server noises the update with: z, or Theorem 1's z_delta with adaptive
        clipping (the count's noise takes the rest of z's budget)."""
        if self.count_noise_std is None:
            return self.noise_multiplier
        from lifelong.privacy.clipping import adaptive_update_noise_multiplier

        try:
            return adaptive_update_noise_multiplier(self.noise_multiplier, self.count_noise_std)
        except ValueError as exc:
            raise PrivacyBudgetError(f"adaptive clipping: {exc}") from None

    @property
    def sample_rate(self) -> float:
        """Accounted sampling rate ``q' = S' / N'`` (the simulated one when not extrapolating)."""
        return self.accounted_cohort_size / self.accounted_population

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon for the accounted population after ``rounds`` (default: the whole run)."""
        return epsilon(self.accounted_noise_multiplier, self.sample_rate,
                       self.rounds if rounds is None else rounds, self.delta,
                       self.value_discretization_interval)

    def epsilon_per_round(self) -> Iterator[float]:
        return epsilon_per_round(self.accounted_noise_multiplier, self.sample_rate, self.rounds, self.delta,
                                 self.value_discretization_interval)

    def describe(self, epsilon_value: float | None = None) -> str:
        """One line saying what the epsilon means and which population it is for."""
        eps = self.epsilon() if epsilon_value is None else epsilon_value
        text = (f"user-level ({eps:.3g}, {self.delta:g})-DP after {self.rounds} rounds for a population of "
                f"{self.accounted_population} users, cohort {self.accounted_cohort_size} per round "
                f"(q={self.sample_rate:.3g}), noise multiplier {self.accounted_noise_multiplier:.4g}")
        if self.extrapolated:
            text += (f"; EXTRAPOLATED: simulated {self.cohort_size} of {self.population} clients with noise "
                     f"multiplier {self.noise_multiplier:.4g} (same noise on the average); the guarantee "
                     f"holds only for a deployment with the stated population and cohort")
        if self.count_noise_std is not None:
            text += (f"; adaptive clipping: update noise multiplier {self.update_noise_multiplier:.4g} and "
                     f"clipped-count noise std {self.count_noise_std:.4g} (together the cost of "
                     f"{self.noise_multiplier:.4g}, Andrew et al. Thm 1)")
        return text


def _check(noise_multiplier: float, q: float, rounds: int, delta: float, floor: bool = True) -> None:
    """Refuse what the accountant cannot (or should not) account; ``floor``: also a z the PLD would
    take minutes and gigabytes for (the accounted z; a simulated one may be smaller)."""
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyBudgetError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if floor and 0 < noise_multiplier < MIN_NOISE_MULTIPLIER:
        raise PrivacyBudgetError(f"noise multiplier {noise_multiplier:g} is below {MIN_NOISE_MULTIPLIER:g}: the "
                                 "guarantee would be meaningless (epsilon in the thousands) and accounting it "
                                 "takes minutes and gigabytes; use 0 to clip without noise (epsilon inf), or at "
                                 f"least {MIN_NOISE_MULTIPLIER:g}")
    if not 0.0 <= q <= 1.0:
        raise PrivacyBudgetError(f"sample rate must be in [0, 1], got {q}")
    if not (isinstance(rounds, numbers.Integral) and not isinstance(rounds, bool) and rounds >= 0):
        raise PrivacyBudgetError(f"rounds must be an int >= 0, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
