"""Frequentist tests and intervals from summary statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint, proportions_ztest

from abflow.core.errors import Invalid

ALTERNATIVES = ("two-sided", "larger", "smaller")  # "larger": B's parameter above A's


class StatsInputError(Invalid):
    """The summaries cannot give this statistic (e.g. an empty group); the message says why."""


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float
    alternative: str = "two-sided"


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_counts(successes: int, n: int, name: str) -> None:
    if n <= 0:
        raise StatsInputError(f"group {name} is empty (n = {n})")
    if not 0 <= successes <= n:
        raise StatsInputError(f"group {name}: successes {successes} outside [0, {n}]")


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise StatsInputError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")


def two_proportion_z_test(successes_a: int, n_a: int, successes_b: int, n_b: int,
                          alternative: str = "two-sided") -> TestResult:
    """Pooled two-proportion z-test of B's rate against A's ("larger": B above A)."""
    _check_counts(successes_a, n_a, "A")
    _check_counts(successes_b, n_b, "B")
    _check_alternative(alternative)
    if successes_a + successes_b in (0, n_a + n_b):
        # No variation at all: the rates are equal and nothing speaks against it.
        return TestResult(0.0, 1.0, alternative)
    z, p = proportions_ztest([successes_b, successes_a], [n_b, n_a], alternative=alternative)
    return TestResult(float(z), float(p), alternative)


def chi_square_test(successes_a: int, n_a: int, successes_b: int, n_b: int, correction: bool = True) -> TestResult:
    """Chi-square test of independence on the 2x2 table (Yates' continuity correction by default)."""
    _check_counts(successes_a, n_a, "A")
    _check_counts(successes_b, n_b, "B")
    table = np.array([[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]])
    if (table.sum(axis=0) == 0).any():
        return TestResult(0.0, 1.0)
    chi2, p, _, _ = stats.chi2_contingency(table, correction=correction)
    return TestResult(float(chi2), float(p))


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for a rate: sensible at 0 % and 100 % and for small n."""
    _check_counts(successes, n, "")
    low, high = proportion_confint(successes, n, alpha=1 - level, method="wilson")
    estimate = successes / n
    # At 0 and n the bound equals the estimate exactly; keep rounding from putting it outside.
    return Interval(estimate, min(float(low), estimate), max(float(high), estimate), level)


def rate_difference_interval(successes_a: int, n_a: int, successes_b: int, n_b: int,
                             level: float = 0.95) -> Interval:
    """Interval for rate B − rate A (Newcombe's hybrid score method: good coverage near 0 and 1)."""
    _check_counts(successes_a, n_a, "A")
    _check_counts(successes_b, n_b, "B")
    low, high = confint_proportions_2indep(successes_b, n_b, successes_a, n_a, method="newcomb",
                                           compare="diff", alpha=1 - level)
    return Interval(successes_b / n_b - successes_a / n_a, float(low), float(high), level)


def _check_paired(both: int, only_a: int, only_b: int, n: int) -> None:
    if n <= 0:
        raise StatsInputError(f"no pairs (n = {n})")
    if min(both, only_a, only_b) < 0 or both + only_a + only_b > n:
        raise StatsInputError(f"paired counts both={both}, only A={only_a}, only B={only_b} do not fit in n = {n}")


def mcnemar_test(only_a: int, only_b: int) -> TestResult:
    """McNemar's exact test that two paired rates are equal, from the discordant pairs:
    ``only_a`` pairs where only A had the event, ``only_b`` where only B had it."""
    if min(only_a, only_b) < 0:
        raise StatsInputError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    if only_a + only_b == 0:
        return TestResult(0.0, 1.0)  # the two never differ: nothing speaks against equality
    result = mcnemar([[0, only_a], [only_b, 0]], exact=True)
    return TestResult(float(result.statistic), float(result.pvalue))


def paired_rate_difference_interval(both: int, only_a: int, only_b: int, n: int, level: float = 0.95) -> Interval:
    """Interval for rate B − rate A measured on the same ``n`` units (Newcombe 1998, method 10:
    the two Wilson intervals combined with the pairs' correlation)."""
    _check_paired(both, only_a, only_b, n)
    neither = n - both - only_a - only_b
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    a, b = wilson_interval(both + only_a, n, level), wilson_interval(both + only_b, n, level)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # The pairs' correlation, its positive part shrunk by n/2 as Newcombe does (wider, never narrower).
    association: float = both * neither - only_a * only_b
    if association > 0:
        association = max(0.0, association - n / 2)
    phi = association / math.sqrt(margins) if margins else 0.0
    difference = p_b - p_a
    below = math.sqrt(max(0.0, (p_b - b.low) ** 2 - 2 * phi * (p_b - b.low) * (a.high - p_a) + (a.high - p_a) ** 2))
    above = math.sqrt(max(0.0, (b.high - p_b) ** 2 - 2 * phi * (b.high - p_b) * (p_a - a.low) + (p_a - a.low) ** 2))
    return Interval(difference, max(-1.0, difference - below), min(1.0, difference + above), level)


def relative_lift_interval(mean_a: float, var_mean_a: float, mean_b: float, var_mean_b: float,
                           level: float = 0.95) -> Interval:
    """Interval for the relative lift (B − A) / |A| by the delta method.

    Divided by |A| (as gbstats does), so that the sign says whether B is above A also when A's
    mean is negative (signed rewards, custom metrics); B/A − 1 would flip it. ``var_mean_*`` is
    the variance of each group's *mean* (for a rate: p(1 − p)/n; for a mean: s²/n). For
    independent groups Var ≈ Var(B)/A² + B² Var(A)/A⁴, whatever A's sign.
    """
    if mean_a == 0:
        raise StatsInputError("the relative lift is undefined when A's mean is 0")
    lift = (mean_b - mean_a) / abs(mean_a)
    se = math.sqrt(var_mean_b / mean_a**2 + mean_b**2 * var_mean_a / mean_a**4)
    if not se > 0:
        raise StatsInputError("neither mean varies: the relative lift has no interval")
    z = stats.norm.ppf(0.5 + level / 2)
    return Interval(lift, lift - z * se, lift + z * se, level)


def rate_lift_interval(successes_a: int, n_a: int, successes_b: int, n_b: int, level: float = 0.95) -> Interval:
    """Relative lift of B's rate over A's, with its delta-method interval.

    Refused while a group has no success or no failure: its rate's delta-method variance is then
    0, and the interval would claim a certainty the data do not have (B with no success gave
    [−1, −1])."""
    _check_counts(successes_a, n_a, "A")
    _check_counts(successes_b, n_b, "B")
    for name, successes, n in (("A", successes_a, n_a), ("B", successes_b, n_b)):
        if successes in (0, n):
            raise StatsInputError(f"group {name} has {'no' if successes == 0 else 'only'} successes: the delta "
                                  "method gives the lift no interval yet")
    pa, pb = successes_a / n_a, successes_b / n_b
    return relative_lift_interval(pa, pa * (1 - pa) / n_a, pb, pb * (1 - pb) / n_b, level)


@dataclass(frozen=True)
class MeanSummary:
    """A group's count, sum and sum of squares, as variant_windows stores them."""

    n: int
    total: float
    total_sq: float

    def __add__(self, other: "MeanSummary") -> "MeanSummary":
        if not isinstance(other, MeanSummary):
            return NotImplemented
        return MeanSummary(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def variance(self) -> float:
        """Sample variance (n − 1 denominator)."""
        if self.n < 2:
            raise StatsInputError(f"a variance needs at least 2 observations, got {self.n}")
        squares = self.total_sq - self.total**2 / self.n
        # Σy² − (Σy)²/n cancels catastrophically when every value is the same: what is left is
        # rounding (up to n·ε·Σy² when the sums were added one value at a time), not spread.
        if squares <= 1e-10 * self.total_sq:
            return 0.0
        return squares / (self.n - 1)


def welch_t_test(a: MeanSummary, b: MeanSummary, alternative: str = "two-sided") -> TestResult:
    """Welch's unequal-variance t-test of B's mean against A's, from summaries."""
    _check_alternative(alternative)
    scipy_alternative = {"two-sided": "two-sided", "larger": "greater", "smaller": "less"}[alternative]
    if a.variance == 0 and b.variance == 0:
        raise StatsInputError("both groups have zero variance: the t statistic is undefined")
    t, p = stats.ttest_ind_from_stats(b.mean, math.sqrt(b.variance), b.n, a.mean, math.sqrt(a.variance), a.n,
                                      equal_var=False, alternative=scipy_alternative)
    return TestResult(float(t), float(p), alternative)


def mean_difference_interval(a: MeanSummary, b: MeanSummary, level: float = 0.95) -> Interval:
    """Welch interval for mean B − mean A (Welch–Satterthwaite degrees of freedom)."""
    va, vb = a.variance / a.n, b.variance / b.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1)) if se > 0 else float("inf")
    t = stats.t.ppf(0.5 + level / 2, df)
    diff = b.mean - a.mean
    return Interval(diff, diff - t * se, diff + t * se, level)


@dataclass(frozen=True)
class RatioSummary:
    """Moment sums of a ratio metric over a group of units: Σ numerator / Σ denominator, where each
    unit contributes its own numerator y and denominator x (conversions and invocations, correct
    and labelled predictions, 2·tp and 2·tp + fp + fn).

    ``mean`` is the ratio R = Σy / Σx; ``variance`` is the per-unit variance of its linearisation
    (y − R·x) / x̄, so that Var(R̂) ≈ variance / n: the delta method of Deng, Knoblich and Lu,
    *Applying the Delta Method in Metric Analytics* (KDD 2018). Units, not events, are the
    observations, so a unit that comes back many times counts once, with all its events.
    ``stratified_means`` and ``merge_thin_periods`` take it where they take a ``MeanSummary``.
    """

    n: int
    sum_x: float
    sum_y: float
    sum_xx: float
    sum_yy: float
    sum_xy: float

    def __add__(self, other: "RatioSummary | MeanSummary") -> "RatioSummary":
        if isinstance(other, MeanSummary) and other.n == 0:
            return self  # an empty cell of either kind adds nothing
        if not isinstance(other, RatioSummary):
            return NotImplemented
        return RatioSummary(self.n + other.n, self.sum_x + other.sum_x, self.sum_y + other.sum_y,
                            self.sum_xx + other.sum_xx, self.sum_yy + other.sum_yy, self.sum_xy + other.sum_xy)

    __radd__ = __add__

    @classmethod
    def of_units(cls, x, y) -> "RatioSummary":
        """From per-unit denominators ``x`` and numerators ``y`` (for tests and simulations)."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        return cls(len(x), float(x.sum()), float(y.sum()), float(x @ x), float(y @ y), float(x @ y))

    @property
    def mean(self) -> float:
        if self.sum_x == 0:
            raise StatsInputError("the ratio is undefined: its denominator sums to 0")
        return self.sum_y / self.sum_x

    @property
    def variance(self) -> float:
        if self.n < 2:
            raise StatsInputError(f"a variance needs at least 2 units, got {self.n}")
        n, ratio = self.n, self.mean
        mean_x = self.sum_x / n
        var_x = (self.sum_xx - self.sum_x**2 / n) / (n - 1)
        var_y = (self.sum_yy - self.sum_y**2 / n) / (n - 1)
        cov_xy = (self.sum_xy - self.sum_x * self.sum_y / n) / (n - 1)
        linearised = var_y - 2 * ratio * cov_xy + ratio**2 * var_x
        # As for means: what cancels to within rounding of the squares is no spread at all.
        if linearised <= 1e-10 * (self.sum_yy + ratio**2 * self.sum_xx) / n:
            return 0.0
        return linearised / mean_x**2


def ratio_difference_test(a: RatioSummary, b: RatioSummary, level: float = 0.95,
                          alternative: str = "two-sided") -> tuple[TestResult, Interval]:
    """z-test and interval for R_B − R_A by the delta method (large samples of units)."""
    _check_alternative(alternative)
    variance = a.variance / a.n + b.variance / b.n
    if variance <= 0:
        raise StatsInputError("both groups have zero variance: the test is undefined")
    difference = b.mean - a.mean
    se = math.sqrt(variance)
    z = difference / se
    p = {"two-sided": 2 * stats.norm.sf(abs(z)), "larger": stats.norm.sf(z), "smaller": stats.norm.cdf(z)}[alternative]
    half = stats.norm.ppf(0.5 + level / 2) * se
    return TestResult(float(z), float(p), alternative), Interval(difference, difference - half, difference + half, level)

