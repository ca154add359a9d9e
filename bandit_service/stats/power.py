"""Power and sample size: per group, for rates and for means, one- or two-sided, unequal groups.

Rates use the normal approximation with the pooled variance under the null and
the unpooled one under the alternative (Fleiss; the formula of seed 001):

    n_A = (z_a sqrt(p̄ q̄ (1 + 1/k)) + z_b sqrt(p_A q_A + p_B q_B / k))² / (p_B − p_A)²,   n_B = k n_A,

with p̄ = (p_A + k p_B) / (1 + k). Means use statsmodels' t-test power.
"""

from __future__ import annotations

import math

from scipy import optimize, stats
from statsmodels.stats.power import TTestIndPower

from bandit_service.stats.frequentist import StatsInputError


def _z_alpha(alpha: float, two_sided: bool) -> float:
    if not 0 < alpha < 1:
        raise StatsInputError(f"alpha must be in (0, 1), got {alpha}")
    return stats.norm.ppf(1 - alpha / 2) if two_sided else stats.norm.ppf(1 - alpha)


def sample_size_proportions(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0,
                            two_sided: bool = True) -> tuple[int, int]:
    """(n_A, n_B) to detect rate p_B against p_A; ``ratio`` = n_B / n_A."""
    if not (0 < p_a < 1 and 0 < p_b < 1) or p_a == p_b:
        raise StatsInputError(f"need two different rates in (0, 1), got {p_a} and {p_b}")
    if not 0 < power < 1 or ratio <= 0:
        raise StatsInputError("power must be in (0, 1) and ratio > 0")
    k = ratio
    pooled = (p_a + k * p_b) / (1 + k)
    z_a, z_b = _z_alpha(alpha, two_sided), stats.norm.ppf(power)
    root = z_a * math.sqrt(pooled * (1 - pooled) * (1 + 1 / k)) + z_b * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b) / k)
    if root <= 0:  # a power this low is reached with no data at all (statsmodels says 0 too)
        return 0, 0
    n_a = root**2 / (p_b - p_a) ** 2
    return math.ceil(n_a), math.ceil(k * n_a)


def power_proportions(p_a: float, p_b: float, n_a: int, n_b: int, alpha: float = 0.05,
                      two_sided: bool = True) -> float:
    """Power of the pooled z-test with these group sizes, if the true rates are p_A and p_B."""
    k = n_b / n_a
    pooled = (p_a + k * p_b) / (1 + k)
    se_null = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    se_alt = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    z_a = _z_alpha(alpha, two_sided)
    delta = abs(p_b - p_a)
    power = stats.norm.cdf((delta - z_a * se_null) / se_alt)
    if two_sided:
        power += stats.norm.cdf((-delta - z_a * se_null) / se_alt)
    return float(power)


def mde_proportions(p_a: float, n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8,
                    two_sided: bool = True) -> float:
    """The smallest absolute lift above p_A that these group sizes detect with ``power``."""
    def shortfall(delta: float) -> float:
        return power_proportions(p_a, p_a + delta, n_a, n_b, alpha, two_sided) - power

    lower, upper = 1e-12, 1 - p_a - 1e-9
    if shortfall(upper) < 0:
        raise StatsInputError("no lift up to a rate of 100 % reaches that power with these group sizes")
    if shortfall(lower) > 0:
        raise StatsInputError(f"power {power} is below what a test at alpha {alpha} has with no lift at all: "
                              "ask for a power above alpha")
    return float(optimize.brentq(shortfall, lower, upper, xtol=1e-12))


def sample_size_means(difference: float, std: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0,
                      two_sided: bool = True) -> tuple[int, int]:
    """(n_A, n_B) for Welch/Student t-tests to detect a mean difference with common std ``std``."""
    if std <= 0 or difference == 0:
        raise StatsInputError("need std > 0 and a non-zero difference")
    n_a = TTestIndPower().solve_power(effect_size=abs(difference) / std, alpha=alpha, power=power, ratio=ratio,
                                      alternative="two-sided" if two_sided else "larger")
    return math.ceil(n_a), math.ceil(ratio * n_a)


def msprt_power(difference: float, variance: float, tau: float, alpha: float = 0.05) -> float:
    """Power of the mixture SPRT (``stats.sequential.msprt``) at a look where the difference estimate
    has ``variance``, if the true difference is ``difference``: the chance that its confidence
    sequence excludes 0 there. (It may have rejected at an earlier look too, so this is the least
    power of a test looked at up to this sample.)"""
    if variance <= 0 or tau <= 0:
        raise StatsInputError("variance and tau must be positive")
    t2 = tau * tau
    half_width = math.sqrt(variance * (variance + t2) / t2 * (math.log((variance + t2) / variance) - 2 * math.log(alpha)))
    se = math.sqrt(variance)
    return float(stats.norm.cdf((abs(difference) - half_width) / se) + stats.norm.cdf((-abs(difference) - half_width) / se))


def sample_size_msprt(difference: float, var_a: float, var_b: float, tau: float, alpha: float = 0.05,
                      power: float = 0.8, ratio: float = 1.0) -> tuple[int, int]:
    """(n_A, n_B) at which the always-valid test the decision uses (the mixture SPRT with mixing scale
    ``tau``) detects ``difference`` with ``power``; ``var_*`` are the per-unit variances and
    ``ratio`` = n_B / n_A. About twice a fixed-horizon test's sample at the usual α, power and τ:
    the price of looking at every moment."""
    if difference == 0 or var_a < 0 or var_b < 0 or var_a + var_b <= 0 or tau <= 0 or ratio <= 0:
        raise StatsInputError("need a non-zero difference, variances >= 0 (not both 0), tau > 0 and ratio > 0")
    if not 0 < power < 1:
        raise StatsInputError(f"power must be in (0, 1), got {power}")

    def shortfall(n_a: float) -> float:
        return msprt_power(difference, var_a / n_a + var_b / (ratio * n_a), tau, alpha) - power

    low, high = 1.0, 10.0
    if shortfall(low) >= 0:
        return 1, math.ceil(ratio)
    while shortfall(high) < 0:
        low, high = high, high * 10
        if high > 1e15:
            raise StatsInputError("no sample reaches that power")
    n_a = optimize.brentq(shortfall, low, high, xtol=1e-6)
    return math.ceil(n_a), math.ceil(ratio * n_a)
