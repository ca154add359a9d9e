"""Metric evidence from aggregated sums, shared by the report and the rollout controller. Pure.

``cells`` are a metric's sums per allocation period, ``[{variant: MeanSummary}, …]``;
``sums`` are one variant's column sums (invocations, conversions, reward_sum,
reward_sq_sum, errors) as ``storage.queries`` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

from abflow.core.config import MetricConfig
from bandit_service.stats.adaptive import merge_thin_periods, rate_cell, stratified_means
from bandit_service.stats.decision import GuardrailEvidence
from bandit_service.stats.frequentist import MeanSummary, StatsInputError
from bandit_service.stats.guardrails import slower_share, slower_share_variance
from bandit_service.stats.sequential import msprt

RATE_METRICS = {"conversion_rate": "conversions", "error_rate": "errors"}
QUANTILES = {"latency_p95": 0.95, "latency_p99": 0.99}


def metric_cell(name: str, sums: dict) -> MeanSummary:
    """One variant's observations of metric ``name`` as a mean of per-invocation values."""
    n = int(sums.get("invocations", 0))
    if name in RATE_METRICS:
        return rate_cell(sums.get(RATE_METRICS[name], 0), n)
    return MeanSummary(n, float(sums.get("reward_sum", 0.0)), float(sums.get("reward_sq_sum", 0.0)))


def metric_cells(name: str, periods: list[dict[str, dict]]) -> list[dict[str, MeanSummary]]:
    return [{variant: metric_cell(name, sums) for variant, sums in period.items()} for period in periods]


@dataclass(frozen=True)
class Difference:
    difference: float  # challenger − champion, period-weighted
    variance: float  # of the difference
    champion: object  # StratifiedMean of each side
    challenger: object
    periods: int  # used, after merging
    merged: int  # periods merged into a neighbour


def stratified_difference(cells: list[dict[str, MeanSummary]], champion: str, challenger: str) -> Difference:
    """B − A stratified by allocation period (see ``stats.adaptive``)."""
    merged = merge_thin_periods(cells, [champion, challenger])
    traffic = [sum(cell.n for cell in period.values()) for period in merged]
    means = stratified_means(merged, traffic, [champion, challenger])
    a, b = means[champion], means[challenger]
    return Difference(b.mean - a.mean, a.variance + b.variance, a, b, len(merged), len(cells) - len(merged))


def guardrail_row(metric: MetricConfig, champion: str, challenger: str, periods: list[dict[str, dict]],
                  histograms: dict[str, list[int]], alpha: float) -> dict:
    """Non-inferiority of ``challenger`` on ``metric``, always valid (mixture SPRT with τ = the margin).

    ``excess`` is how much worse the challenger is (positive: worse); the guardrail
    passes when the confidence sequence of the excess lies below the margin and
    harms when it lies above it. Returns the report's guardrail row, with ``error``
    instead of the figures when the data cannot answer yet.
    """
    row = {"metric": metric.name, "variant": challenger, "against": champion, "margin": metric.margin}
    try:
        if metric.name in QUANTILES:
            share, expected, n_b = slower_share(histograms.get(champion) or [], histograms.get(challenger) or [],
                                                QUANTILES[metric.name])
            excess, variance = share - expected, slower_share_variance(share, expected, n_b)
            row["detail"] = (f"{share:.2%} of {challenger}'s requests are slower than {champion}'s "
                             f"{metric.name[-3:]} (expected {expected:.0%})")
        else:
            found = stratified_difference(metric_cells(metric.name, periods), champion, challenger)
            excess = -found.difference if metric.higher_is_better else found.difference
            variance = found.variance
            row["detail"] = (f"{metric.name}: {champion} {found.champion.mean:.4g}, "
                             f"{challenger} {found.challenger.mean:.4g}")
            if variance <= 0 and metric.name in RATE_METRICS:
                # Not one event in either variant (no errors at all): take the variance one
                # event in each would give, rather than certainty.
                n_a, n_b = (sum(int(p.get(name, {}).get("invocations", 0)) for p in periods)
                            for name in (champion, challenger))
                variance = (1 - 1 / n_a) / n_a**2 + (1 - 1 / n_b) / n_b**2
        if variance <= 0:
            raise StatsInputError("no variation in either variant")
    except StatsInputError as exc:
        return {**row, "error": str(exc)}
    sequential = msprt(excess, variance, metric.margin, alpha)
    evidence = GuardrailEvidence(metric.name, metric.margin, excess, sequential.interval.low, sequential.interval.high)
    row.update(excess=excess, low=evidence.low, high=evidence.high, non_inferior=evidence.non_inferior,
               harmful=evidence.harmful,
               status="harm" if evidence.harmful else "pass" if evidence.non_inferior else "not yet shown")
    return row
