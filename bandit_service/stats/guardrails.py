"""Guardrails: non-inferiority of a challenger's error rate and latency, and rank tests on latency histograms.

A guardrail asks "is the challenger *not worse* than the champion by more than
a margin?". For a rate (errors) that is the one-sided test of
H0: rate_B − rate_A ≥ margin against H1: rate_B − rate_A < margin (unpooled
standard error). For a latency quantile (p95, p99), the champion's quantile
``q_A`` (from its histogram) becomes a threshold, and the question becomes a
rate again: the challenger's share of requests slower than ``q_A`` must not
exceed ``1 − quantile`` by more than the margin.

``mann_whitney_from_histograms`` is the Mann-Whitney U test on binned data
(every value of a bucket is a tie), with the tie-corrected normal approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from abflow.core.windowing import LATENCY_BUCKET_EDGES_MS, histogram_quantile
from bandit_service.stats.frequentist import StatsInputError, TestResult, _check_counts


@dataclass(frozen=True)
class NonInferiority:
    difference: float  # challenger − champion (rates), or the challenger's excess share (quantiles)
    margin: float
    upper_bound: float  # one-sided (1 − alpha) upper confidence bound of the difference
    p_value: float
    passed: bool  # non-inferior: the upper bound is below the margin


def rate_non_inferiority(bad_a: int, n_a: int, bad_b: int, n_b: int, margin: float,
                         alpha: float = 0.05) -> NonInferiority:
    """Is B's rate of a bad outcome (errors) at most ``margin`` above A's?"""
    _check_counts(bad_a, n_a, "A")
    _check_counts(bad_b, n_b, "B")
    if margin <= 0:
        raise StatsInputError(f"the margin must be positive, got {margin}")
    pa, pb = bad_a / n_a, bad_b / n_b
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    difference = pb - pa
    if se == 0:
        passed = difference < margin
        return NonInferiority(difference, margin, difference, 0.0 if passed else 1.0, passed)
    z = (difference - margin) / se
    upper = float(difference + stats.norm.ppf(1 - alpha) * se)
    return NonInferiority(difference, margin, upper, float(stats.norm.cdf(z)), bool(upper < margin))


def slower_share(hist_a: list[int], hist_b: list[int], quantile: float) -> tuple[float, float, int]:
    """(share of B slower than A's ``quantile``, the share expected if B were as fast, B's count)."""
    threshold = histogram_quantile(hist_a, quantile)
    if threshold is None or sum(hist_b) == 0:
        raise StatsInputError("both variants need latency observations")
    edges = list(LATENCY_BUCKET_EDGES_MS) + [math.inf]
    slower = sum(count for count, edge in zip(hist_b, edges) if edge > threshold)
    n_b = sum(hist_b)
    return slower / n_b, 1 - quantile, n_b


def slower_share_variance(share: float, expected: float, n_b: int) -> float:
    """Variance of the share: the larger of the observed and the expected binomial variance."""
    return max(share * (1 - share), expected * (1 - expected)) / n_b


def latency_quantile_non_inferiority(hist_a: list[int], hist_b: list[int], quantile: float, margin: float,
                                     alpha: float = 0.05) -> NonInferiority:
    """Is B's ``quantile`` latency not worse than A's? B's share above A's quantile may exceed
    ``1 − quantile`` by at most ``margin`` (e.g. p95 with margin 0.01: at most 6 % of B slower)."""
    share, expected, n_b = slower_share(hist_a, hist_b, quantile)
    se = math.sqrt(slower_share_variance(share, expected, n_b))
    upper = float(share - expected + stats.norm.ppf(1 - alpha) * se)
    z = (share - expected - margin) / se
    return NonInferiority(share - expected, margin, upper, float(stats.norm.cdf(z)), bool(upper < margin))


def mann_whitney_from_histograms(hist_a: list[int], hist_b: list[int], alternative: str = "two-sided") -> TestResult:
    """Mann-Whitney U of B against A on histograms over the same buckets (ties corrected); U counts B > A."""
    a = np.asarray(hist_a, dtype=float)
    b = np.asarray(hist_b, dtype=float)
    if a.shape != b.shape:
        raise StatsInputError("the histograms must share their buckets")
    n_a, n_b = a.sum(), b.sum()
    if n_a == 0 or n_b == 0:
        raise StatsInputError("both groups need observations")
    totals = a + b
    # Mid-ranks of each bucket in the pooled sample.
    before = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    mid_rank = before + (totals + 1) / 2
    rank_sum_b = float((b * mid_rank).sum())
    u_b = rank_sum_b - n_b * (n_b + 1) / 2
    n = n_a + n_b
    tie_term = float((totals**3 - totals).sum())
    variance = n_a * n_b / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    mean = n_a * n_b / 2
    if variance <= 0:  # every value in one bucket: all ties, U sits at its mean
        return TestResult(float(u_b), 1.0, alternative)
    # Continuity correction of 0.5 toward the mean, as scipy's asymptotic method does.
    if alternative == "two-sided":
        z = (abs(u_b - mean) - 0.5) / math.sqrt(variance)
        p = 2 * stats.norm.sf(max(z, 0.0))
    elif alternative == "larger":
        z = (u_b - mean - 0.5) / math.sqrt(variance)
        p = stats.norm.sf(z)
    elif alternative == "smaller":
        z = (u_b - mean + 0.5) / math.sqrt(variance)
        p = stats.norm.cdf(z)
    else:
        raise StatsInputError(f"unknown alternative {alternative!r}")
    return TestResult(float(u_b), float(min(p, 1.0)), alternative)
