"""Guardrails and rank tests on histograms, against scipy/statsmodels and by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats import proportion as sm_proportion

from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from bandit_service.stats.frequentist import StatsInputError
from bandit_service.stats.guardrails import (
    latency_quantile_non_inferiority,
    mann_whitney_from_histograms,
    rate_non_inferiority,
)


def histogram(latencies) -> list[int]:
    counts = [0] * LATENCY_BUCKETS
    for value in latencies:
        counts[latency_bucket(value)] += 1
    return counts


def test_mann_whitney_on_histograms_matches_scipy_on_the_binned_values():
    rng = np.random.default_rng(8)
    for _ in range(40):
        a = rng.lognormal(3.5, 0.6, rng.integers(5, 400))
        b = rng.lognormal(3.5 + rng.uniform(-0.3, 0.3), 0.6, rng.integers(5, 400))
        hist_a, hist_b = histogram(a), histogram(b)
        bins_a = np.repeat(np.arange(LATENCY_BUCKETS), hist_a)
        bins_b = np.repeat(np.arange(LATENCY_BUCKETS), hist_b)
        for ours, theirs in [("two-sided", "two-sided"), ("larger", "greater"), ("smaller", "less")]:
            expected = stats.mannwhitneyu(bins_b, bins_a, alternative=theirs, method="asymptotic", use_continuity=True)
            got = mann_whitney_from_histograms(hist_a, hist_b, ours)
            assert got.statistic == pytest.approx(expected.statistic)
            assert got.p_value == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)


def test_rate_non_inferiority_matches_statsmodels():
    rng = np.random.default_rng(9)
    for _ in range(100):
        n_a, n_b = (int(x) for x in rng.integers(500, 50_000, 2))
        bad_a, bad_b = int(rng.binomial(n_a, 0.02)), int(rng.binomial(n_b, 0.025))
        margin = float(rng.uniform(0.001, 0.02))
        ours = rate_non_inferiority(bad_a, n_a, bad_b, n_b, margin)
        _, p = sm_proportion.test_proportions_2indep(bad_b, n_b, bad_a, n_a, value=margin, compare="diff",
                                       alternative="smaller", method="wald")
        assert ours.p_value == pytest.approx(p, rel=1e-6, abs=1e-12)
        assert ours.passed == (ours.p_value < 0.05)


def test_rate_guardrail_error_rates_by_simulation():
    rng = np.random.default_rng(10)
    n, base, margin = 20_000, 0.02, 0.005

    def pass_rate(true_b: float, runs: int = 2_000) -> float:
        passes = 0
        for _ in range(runs):
            passes += rate_non_inferiority(int(rng.binomial(n, base)), n, int(rng.binomial(n, true_b)), n, margin).passed
        return passes / runs

    assert pass_rate(base + margin) <= 0.05 + 0.015  # exactly at the margin: a pass is a false pass
    assert pass_rate(base) >= 0.9  # as good as the champion
    assert pass_rate(base + 2 * margin) <= 0.001  # clearly worse: fails


def test_latency_quantile_guardrail():
    rng = np.random.default_rng(11)
    champion = histogram(rng.lognormal(3.5, 0.5, 50_000))
    same = histogram(rng.lognormal(3.5, 0.5, 50_000))
    slower = histogram(rng.lognormal(3.5 + np.log(1.3), 0.5, 50_000))
    assert latency_quantile_non_inferiority(champion, same, 0.95, margin=0.01).passed
    result = latency_quantile_non_inferiority(champion, slower, 0.95, margin=0.01)
    assert not result.passed and result.difference > 0.05
    assert latency_quantile_non_inferiority(champion, slower, 0.99, margin=0.005).passed is False
    with pytest.raises(StatsInputError):
        latency_quantile_non_inferiority([0] * LATENCY_BUCKETS, same, 0.95, 0.01)
    with pytest.raises(StatsInputError):
        rate_non_inferiority(1, 10, 1, 10, margin=0)
