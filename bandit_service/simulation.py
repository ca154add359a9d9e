"""Simulations (pure, seeded): the regret of a policy against the oracle with weights refreshed in
batches as in production, and the bias of estimates under adaptive allocation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bandit_service.policies import ArmStats, PolicyConfig, allocate
from bandit_service.stats.adaptive import merge_thin_periods, pooled, rate_cell, stratified_means
from bandit_service.stats.frequentist import MeanSummary


def simulate_regret(config: PolicyConfig, rates: list[float], users: int, seed: int,
                    refresh_every: int = 1_000) -> float:
    """Expected conversions lost against always serving the best arm, over ``users`` users.

    Users arrive in batches of ``refresh_every``; each batch is routed by the
    weights computed from everything observed before it (the production loop:
    aggregates -> weights -> routing), and its conversions are Bernoulli draws.
    """
    rng = np.random.default_rng(seed)
    k = len(rates)
    n = np.zeros(k, dtype=np.int64)
    r = np.zeros(k)
    best = max(rates)
    gaps = best - np.asarray(rates)
    regret = 0.0
    for start in range(0, users, refresh_every):
        size = min(refresh_every, users - start)
        arms = [ArmStats(str(i), 1.0, int(n[i]), float(r[i]), float(r[i])) for i in range(k)]
        weights = np.array(list(allocate(arms, config).weights.values()))
        counts = rng.multinomial(size, weights / weights.sum())
        n += counts
        r += rng.binomial(counts, rates)
        regret += float(counts @ gaps)
    return regret


@dataclass(frozen=True)
class EstimatorCheck:
    """How an estimate of rate B − rate A behaved over many simulated experiments."""

    bias: float  # mean estimate minus the true difference
    coverage: float  # share of intervals that contained the true difference
    false_positive_rate: float | None  # share of significant results, when the true difference is 0


def simulate_adaptive_estimates(base_rates: list[float], lift: float, challenger_shares, users_per_period: int,
                                runs: int, seed: int, level: float = 0.95) -> dict[str, EstimatorCheck]:
    """Naive pooling against stratification by allocation period, when the weights move while the
    conversion rate drifts.

    Period k has ``users_per_period`` users; the champion converts at ``base_rates[k]`` and the
    challenger at ``base_rates[k] + lift``. ``challenger_shares`` is either the challenger's share
    per period or a ``PolicyConfig``, whose weights are computed from everything seen before the
    period (a bandit). Returns {"naive": ..., "stratified": ...}.
    """
    rng = np.random.default_rng(seed)
    z = stats.norm.ppf(0.5 + level / 2)
    estimates = {"naive": [], "stratified": []}
    covered = {"naive": 0, "stratified": 0}
    significant = {"naive": 0, "stratified": 0}
    for _ in range(runs):
        periods = []
        seen = {"A": MeanSummary(0, 0.0, 0.0), "B": MeanSummary(0, 0.0, 0.0)}
        for k, base in enumerate(base_rates):
            if isinstance(challenger_shares, PolicyConfig):
                arms = [ArmStats(name, 1.0, cell.n, cell.total, cell.total_sq) for name, cell in seen.items()]
                share = allocate(arms, challenger_shares).weights["B"]
            else:
                share = challenger_shares[k]
            n_b = int(rng.binomial(users_per_period, share))
            n_a = users_per_period - n_b
            period = {"A": rate_cell(int(rng.binomial(n_a, base)), n_a),
                      "B": rate_cell(int(rng.binomial(n_b, base + lift)), n_b)}
            periods.append(period)
            seen = {name: seen[name] + period[name] for name in seen}
        merged = merge_thin_periods(periods, ["A", "B"])
        kept_traffic = [sum(cell.n for cell in p.values()) for p in merged]
        naive = pooled(periods)
        candidates = {
            "naive": (naive["B"].mean - naive["A"].mean,
                      naive["B"].variance / naive["B"].n + naive["A"].variance / naive["A"].n),
        }
        strat = stratified_means(merged, kept_traffic, ["A", "B"])
        candidates["stratified"] = (strat["B"].mean - strat["A"].mean, strat["B"].variance + strat["A"].variance)
        for name, (difference, variance) in candidates.items():
            half = z * math.sqrt(variance)
            estimates[name].append(difference)
            covered[name] += abs(difference - lift) <= half
            significant[name] += abs(difference) > half
    return {name: EstimatorCheck(float(np.mean(values)) - lift, covered[name] / runs,
                                 significant[name] / runs if lift == 0 else None)
            for name, values in estimates.items()}
