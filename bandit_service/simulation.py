"""Bandit simulation: regret of a policy against the oracle, with weights refreshed in batches as in production. Pure."""

from __future__ import annotations

import numpy as np

from bandit_service.policies import ArmStats, PolicyConfig, allocate


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
