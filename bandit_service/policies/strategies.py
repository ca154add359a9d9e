"""One class per strategy. Semantics follow the SageMaker bandit pipeline this project generalises:
an arm's reward is the sum of its conversions' rewards over its invocations,
``mean = reward_sum / invocations``.

- ``WeightedSampling``: the initial weights, always.
- ``EpsilonGreedy``: 1 - epsilon shared by the arms with the best mean, epsilon spread evenly over all.
- ``UCB1``: everything to the arm(s) with the highest ``mean + sqrt(2 ln N / n)``; untried arms first.
- ``ThompsonSampling``: the posterior probability that each arm is best, by Monte Carlo
  (Beta(1 + r, 1 + n - r) for binary rewards; Normal(mean, s^2 / n) for continuous ones).
"""

from __future__ import annotations

import math

import numpy as np

from bandit_service.policies.base import BINARY, ArmStats, Policy, PolicyConfig, normalise, share_best, stats_seed

THOMPSON_DRAWS = 20_000


class WeightedSampling(Policy):
    name = "WeightedSampling"
    uses_warmup = False

    def weights(self, arms: list[ArmStats], config: PolicyConfig) -> tuple[dict[str, float], dict]:
        return normalise({a.name: a.initial_weight for a in arms}), {}


class EpsilonGreedy(Policy):
    name = "EpsilonGreedy"

    def weights(self, arms: list[ArmStats], config: PolicyConfig) -> tuple[dict[str, float], dict]:
        means = {a.name: a.mean for a in arms}
        share = config.epsilon / len(arms)
        greedy = share_best(arms, means)
        return {name: (1.0 - config.epsilon) * w + share for name, w in greedy.items()}, {"means": means}


class UCB1(Policy):
    name = "UCB1"

    def weights(self, arms: list[ArmStats], config: PolicyConfig) -> tuple[dict[str, float], dict]:
        total = sum(a.invocations for a in arms)
        scores = {
            a.name: (math.inf if a.invocations == 0 else a.mean + math.sqrt(2.0 * math.log(total) / a.invocations))
            for a in arms
        }
        detail = {"means": {a.name: a.mean for a in arms},
                  "scores": {k: (v if math.isfinite(v) else None) for k, v in scores.items()}}
        return share_best(arms, scores), detail


class ThompsonSampling(Policy):
    name = "ThompsonSampling"

    def weights(self, arms: list[ArmStats], config: PolicyConfig) -> tuple[dict[str, float], dict]:
        rng = np.random.default_rng(stats_seed(arms, config.seed))
        weights = thompson_probabilities(arms, config.reward_model, rng)
        return weights, {"means": {a.name: a.mean for a in arms}, "p_best": dict(weights), "draws": THOMPSON_DRAWS}


def thompson_probabilities(arms: list[ArmStats], reward_model: str, rng: np.random.Generator,
                           draws: int = THOMPSON_DRAWS) -> dict[str, float]:
    """P(arm is best) under each arm's posterior, estimated from ``draws`` joint samples."""
    samples = np.empty((draws, len(arms)))
    for column, arm in enumerate(arms):
        if reward_model == BINARY:
            samples[:, column] = rng.beta(1.0 + arm.reward_sum, 1.0 + arm.invocations - arm.reward_sum, draws)
        else:
            samples[:, column] = rng.normal(arm.mean, math.sqrt(_gaussian_variance(arm) / max(arm.invocations, 1)), draws)
    wins = np.bincount(samples.argmax(axis=1), minlength=len(arms))
    return {arm.name: float(wins[i]) / draws for i, arm in enumerate(arms)}


def _gaussian_variance(arm: ArmStats) -> float:
    """Sample variance of the per-invocation reward, with a unit prior so that tiny samples stay uncertain."""
    n = arm.invocations
    if n < 2:
        return 1.0
    mean = arm.reward_sum / n
    variance = max(arm.reward_sq_sum / n - mean * mean, 0.0) * n / (n - 1)
    return (variance * n + 1.0) / (n + 1)


