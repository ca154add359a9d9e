"""Analysis on the randomized unit: users who come back many times and differ from each other.

Simulated the way traffic behaves, not the way a formula assumes: each user has
1 + Poisson(λ) visits, with λ itself varying by user, and a conversion
propensity of their own drawn from a Beta with mean 5 %. Treating invocations
as independent trials (what a two-proportion test on invocation counts does)
then rejects a true null far more often than α; the delta method on per-unit
moment sums, and the proportion of units that converted, do not.
"""

from __future__ import annotations

import numpy as np
import pytest

from bandit_service.stats.frequentist import (
    RatioSummary,
    ratio_difference_test,
    two_proportion_z_test,
)

ALPHA = 0.05


def users(rng: np.random.Generator, n: int, mean_rate: float = 0.05, concentration: float = 4.0,
          mean_visits: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(invocations, conversions) per user: heterogeneous visit counts and propensities."""
    visit_rate = rng.gamma(2.0, mean_visits / 2.0, n)  # users differ in how often they come back
    invocations = 1 + rng.poisson(visit_rate)
    propensity = rng.beta(mean_rate * concentration, (1 - mean_rate) * concentration, n)
    conversions = rng.binomial(invocations, propensity)
    return invocations, conversions


def test_moment_sums_give_the_delta_method_of_the_raw_units():
    rng = np.random.default_rng(1)
    x, y = users(rng, 3_000)
    summary = RatioSummary.of_units(x, y)
    ratio = y.sum() / x.sum()
    linearised = (y - ratio * x) / x.mean()
    assert summary.mean == pytest.approx(ratio, rel=1e-12)
    assert summary.variance / summary.n == pytest.approx(linearised.var(ddof=1) / len(x), rel=1e-9)
    # Adding summaries equals summarising the union (the stream adds them batch by batch).
    half = len(x) // 2
    assert (RatioSummary.of_units(x[:half], y[:half]) + RatioSummary.of_units(x[half:], y[half:])).variance == \
        pytest.approx(summary.variance, rel=1e-9)


def test_a_a_false_positives_on_invocations_against_units():
    """2,000 A/A experiments, 2,000 users per arm: the invocation-level test is inflated, the unit-level
    ones hold α (Monte-Carlo slack: ±1.5 points is over 3 standard errors)."""
    rng = np.random.default_rng(2)
    experiments = 2_000
    rejected = {"invocations as trials": 0, "ratio by the delta method": 0, "units converted": 0}
    for _ in range(experiments):
        (xa, ya), (xb, yb) = users(rng, 2_000), users(rng, 2_000)
        naive = two_proportion_z_test(int(ya.sum()), int(xa.sum()), int(yb.sum()), int(xb.sum()))
        rejected["invocations as trials"] += naive.p_value < ALPHA
        test, _ = ratio_difference_test(RatioSummary.of_units(xa, ya), RatioSummary.of_units(xb, yb))
        rejected["ratio by the delta method"] += test.p_value < ALPHA
        units = two_proportion_z_test(int((ya > 0).sum()), len(ya), int((yb > 0).sum()), len(yb))
        rejected["units converted"] += units.p_value < ALPHA
    rates = {name: count / experiments for name, count in rejected.items()}
    assert rates["invocations as trials"] > 0.15, rates  # the inflation the unit-level analysis removes
    assert abs(rates["ratio by the delta method"] - ALPHA) < 0.015, rates
    assert abs(rates["units converted"] - ALPHA) < 0.015, rates


def test_the_delta_method_interval_covers_the_true_difference():
    """Variants with different propensities (4 % and 5 %); visits do not depend on the variant, so the
    true conversions-per-invocation ratio of each is its mean propensity."""
    rng = np.random.default_rng(3)
    runs, covered = 2_000, 0
    for _ in range(runs):
        a = RatioSummary.of_units(*users(rng, 2_000, mean_rate=0.04))
        b = RatioSummary.of_units(*users(rng, 2_000, mean_rate=0.05))
        _, interval = ratio_difference_test(a, b)
        covered += interval.contains(0.01)
    assert 0.935 <= covered / runs <= 0.965, covered / runs


def test_stratified_by_the_period_of_exposure_under_moving_weights():
    """A bandit moves traffic to B (50 % → 80 % → 95 %) while every user's propensity drifts up
    (3 % → 5 % → 8 %); A and B are the same. Each user counts, with all their later visits, in the
    period of their exposure. Pooled over periods, B looks better (Simpson's paradox); stratified by
    the period of exposure, with the delta-method variance per cell, the estimate is unbiased and
    its interval covers 0 at the nominal rate."""
    from bandit_service.stats.adaptive import merge_thin_periods, pooled, stratified_means

    rng = np.random.default_rng(4)
    schedule = [(0.5, 0.03), (0.8, 0.05), (0.95, 0.08)]  # B's share of new users, mean propensity
    runs, covered, stratified, naive = 1_000, 0, [], []
    for _ in range(runs):
        periods = []
        for share, rate in schedule:
            n_b = rng.binomial(3_000, share)
            periods.append({"A": RatioSummary.of_units(*users(rng, 3_000 - n_b, mean_rate=rate)),
                            "B": RatioSummary.of_units(*users(rng, n_b, mean_rate=rate))})
        merged = merge_thin_periods(periods, ["A", "B"])
        means = stratified_means(merged, [sum(c.n for c in p.values()) for p in merged], ["A", "B"])
        difference = means["B"].mean - means["A"].mean
        half = 1.959964 * np.sqrt(means["A"].variance + means["B"].variance)
        covered += abs(difference) <= half
        stratified.append(difference)
        total = pooled(periods)
        naive.append(total["B"].mean - total["A"].mean)
    figures = (np.mean(naive), np.mean(stratified), covered / runs)
    assert figures[0] > 0.008, figures  # the pooled comparison credits B with the drift
    assert abs(figures[1]) < 0.0005, figures
    assert 0.935 <= figures[2] <= 0.965, figures


def test_always_valid_p_under_peeking_holds_alpha_on_units_not_on_invocations():
    """1,000 A/A experiments looked at 20 times each (every 200 users per arm), stopping at the first
    always-valid p below α. With the delta-method variance of the units the mixture SPRT keeps
    its promise; with invocations taken as independent trials it does not."""
    from bandit_service.stats.sequential import msprt

    rng = np.random.default_rng(6)
    experiments, looks, step = 1_000, 20, 200
    stopped = {"units": 0, "invocations": 0}
    for _ in range(experiments):
        arms = [users(rng, looks * step) for _ in range(2)]
        rejected = {"units": False, "invocations": False}
        for look in range(1, looks + 1):
            n = look * step
            (xa, ya), (xb, yb) = [(x[:n], y[:n]) for x, y in arms]
            a, b = RatioSummary.of_units(xa, ya), RatioSummary.of_units(xb, yb)
            difference = b.mean - a.mean
            tau = 0.1 * (a.sum_y + b.sum_y) / (a.sum_x + b.sum_x)  # the report's: the MDE times the baseline
            unit_variance = a.variance / a.n + b.variance / b.n
            rejected["units"] |= msprt(difference, unit_variance, tau).p_value < ALPHA
            trials_variance = a.mean * (1 - a.mean) / a.sum_x + b.mean * (1 - b.mean) / b.sum_x
            rejected["invocations"] |= msprt(difference, trials_variance, tau).p_value < ALPHA
        for name, hit in rejected.items():
            stopped[name] += hit
    rates = {name: count / experiments for name, count in stopped.items()}
    assert rates["units"] <= ALPHA + 0.015, rates
    assert rates["invocations"] > 2 * ALPHA, rates


def test_seed_003_numbers_on_units():
    """Seed 003's example: A 520 of 5,000 users converted, B 580 of 5,000, one invocation each."""
    from statsmodels.stats.proportion import proportions_ztest

    result = two_proportion_z_test(520, 5_000, 580, 5_000)
    _, reference = proportions_ztest([580, 520], [5_000, 5_000])
    assert result.p_value == pytest.approx(0.055161, abs=5e-7)
    assert result.p_value == pytest.approx(reference, rel=1e-9)
