"""Estimates that stay valid when the allocation weights changed during the test.

When a bandit moves traffic while the metric drifts (weekdays, campaigns), the
pooled mean of a variant over-weights the periods in which it got more
traffic, and the pooled difference between two variants is biased: Simpson's
paradox. The fix (as in GrowthBook's bandits) is to stratify by *allocation
period*: within a period the weights were fixed, so the variants saw the same
population; each period's per-variant mean is then weighted by the period's
share of all traffic, the same weights for every variant:

    mean_v = sum_k w_k mean_vk,   Var(mean_v) = sum_k w_k^2 s_vk^2 / n_vk,   w_k = N_k / N,

where s_vk^2 is the variance of variant v's own observations in period k: each arm keeps its own
variance, as in Welch's test. (A variance pooled over both arms is too small whenever the arm
with fewer units is the noisier one: a 10 % canary, a 5 % rollout stage, an arm a bandit starves.
Pooled, an A/A test of a sd-3 arm on 1,000 units against a sd-1 arm on 9,000 shipped about half
the time.) A cell too thin for its own variance to be trusted alone (under ``OWN_VARIANCE_MIN``
observations, where it is often 0) takes the larger of its own and the period's pooled variance.

Periods are as fine as the aggregates' windows allow: a window belongs to the
period in effect at its start. Consecutive allocation versions whose weights
differ by less than a tolerance form one period, and a period in which a
compared variant has fewer than two observations is merged into its
neighbour (a mean and a variance need them).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from bandit_service.stats.frequentist import MeanSummary, StatsInputError

WEIGHT_TOLERANCE = 0.05  # max absolute weight change inside one period
MIN_CELL = 2  # observations per variant and period
OWN_VARIANCE_MIN = 30  # observations a cell needs for its own variance to stand alone


EMPTY = MeanSummary(0, 0.0, 0.0)  # a variant absent from a period
T = TypeVar("T")


def period_starts(initial: dict[str, float], versions: list[tuple[datetime, dict[str, float]]],
                  tolerance: float = WEIGHT_TOLERANCE) -> list[datetime]:
    """Start times of the allocation periods after the first (which runs on the ``initial`` weights):
    the versions (in time order) whose weights moved by ``tolerance`` or more from the weights
    that began the current period."""
    starts: list[datetime] = []
    reference = initial
    for computed_at, weights in versions:
        if _distance(reference, weights) >= tolerance:
            starts.append(computed_at)
            reference = weights
    return starts


def _distance(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a.get(name, 0.0) - b.get(name, 0.0)) for name in set(a) | set(b))


def period_index(starts: list[datetime], moment: datetime) -> int:
    """0 before the first start, k after the k-th (the same rule as PostgreSQL's width_bucket)."""
    return bisect.bisect_right(starts, moment)


def merge_thin_periods(periods: list[dict[str, MeanSummary]], variants: list[str],
                       min_cell: int = MIN_CELL) -> list[dict[str, MeanSummary]]:
    """Merge each period in which one of ``variants`` has fewer than ``min_cell`` observations into
    the previous period (the first such one into the next)."""
    merged: list[dict[str, MeanSummary]] = []
    carry: dict[str, MeanSummary] = {}
    for period in periods:
        combined = {v: carry.get(v, EMPTY) + period.get(v, EMPTY) for v in set(carry) | set(period)}
        if all(combined.get(v, EMPTY).n >= min_cell for v in variants):
            merged.append(combined)
            carry = {}
        else:
            carry = combined
    if carry:
        if not merged:
            raise StatsInputError(f"need at least {min_cell} observations of every variant compared")
        last = merged.pop()
        merged.append({v: last.get(v, EMPTY) + carry.get(v, EMPTY) for v in set(last) | set(carry)})
    return merged


@dataclass(frozen=True)
class StratifiedMean:
    mean: float
    variance: float  # of the estimate
    periods: int


def stratified_means(periods: list[dict[str, MeanSummary]], traffic: list[int],
                     variants: list[str]) -> dict[str, StratifiedMean]:
    """The period-weighted mean of each of ``variants``; ``traffic[k]`` is period k's invocations
    over all variants (its weight), ``periods`` already merged so that every cell has n ≥ 2.

    A cell's variance is its own (each arm keeps its variance); a cell with fewer than
    ``OWN_VARIANCE_MIN`` observations (a bandit may leave a variant only a handful of users in a
    period, whose own variance is often 0) takes the larger of its own and the variance of the
    period's observations over all ``variants`` together, so that it is never taken as certain.
    Pass the two variants of a comparison.
    """
    if len(periods) != len(traffic) or not periods:
        raise StatsInputError("need one traffic count per period, and at least one period")
    grand = sum(traffic)
    if grand <= 0:
        raise StatsInputError("no traffic")
    sums = {name: [0.0, 0.0] for name in variants}
    for period, weight in zip(periods, traffic):
        share = weight / grand
        together = sum((period.get(name, EMPTY) for name in variants), EMPTY)
        for name in variants:
            cell = period.get(name, EMPTY)
            if cell.n == 0:
                raise StatsInputError(f"variant {name!r} has no observations in a period; merge the periods first")
            variance = cell.variance if cell.n >= OWN_VARIANCE_MIN else max(cell.variance, together.variance)
            sums[name][0] += share * cell.mean
            sums[name][1] += share**2 * variance / cell.n
    return {name: StratifiedMean(mean, variance, len(periods)) for name, (mean, variance) in sums.items()}


def pooled(periods: list[dict[str, T]]) -> dict[str, T]:
    """Every period added together, per variant: the naive estimate's input (any cells that add up:
    ``MeanSummary``, ``RatioSummary``, the report's unit moments)."""
    total: dict[str, T] = {}
    for period in periods:
        for name, cell in period.items():
            total[name] = total[name] + cell if name in total else cell  # type: ignore[operator]
    return total


def rate_cell(successes: float, n: int) -> MeanSummary:
    """A rate as a mean of 0/1 outcomes (successes capped at n: conversions counted in a later window)."""
    successes = min(max(successes, 0.0), n)
    return MeanSummary(n, float(successes), float(successes))
