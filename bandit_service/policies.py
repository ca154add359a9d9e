"""Allocation policies: per-variant statistics in, allocation weights (probabilities summing to 1) out.

Pure and seeded: no I/O, and the same statistics with the same seed give the
same weights. Semantics follow the SageMaker bandit pipeline this project
generalises: an arm's reward is the sum of its conversions' rewards over its
invocations, ``mean = reward_sum / invocations``.

- ``WeightedSampling``: the initial weights, always.
- ``EpsilonGreedy``: 1 - epsilon shared by the arms with the best mean, epsilon spread evenly over all.
- ``UCB1``: everything to the arm(s) with the highest ``mean + sqrt(2 ln N / n)``; untried arms first.
- ``ThompsonSampling``: the posterior probability that each arm is best, by Monte Carlo
  (Beta(1 + r, 1 + n - r) for binary rewards; Normal(mean, s^2 / n) for continuous ones).

Every policy serves the initial weights until each arm has ``warmup``
invocations, and then gives each arm at least ``min_weight``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

BINARY = "binary"
GAUSSIAN = "gaussian"
THOMPSON_DRAWS = 20_000


class PolicyInputError(ValueError):
    """The statistics cannot be turned into weights; the message says why."""


@dataclass(frozen=True)
class ArmStats:
    name: str
    initial_weight: float
    invocations: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0

    @property
    def mean(self) -> float:
        return self.reward_sum / self.invocations if self.invocations else 0.0


@dataclass(frozen=True)
class PolicyConfig:
    strategy: str
    epsilon: float = 0.1
    warmup: int = 0
    min_weight: float = 0.0
    reward_model: str = BINARY  # or GAUSSIAN for continuous rewards such as revenue
    seed: int = 0


@dataclass(frozen=True)
class Allocation:
    weights: dict[str, float]
    phase: str  # "warmup" or the strategy that decided
    detail: dict  # what the rule saw: scores, means, posteriors


def _check(arms: list[ArmStats], config: PolicyConfig) -> None:
    if not arms:
        raise PolicyInputError("no variants")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise PolicyInputError(f"variant names repeat: {names}")
    if not 0.0 <= config.epsilon <= 1.0:
        raise PolicyInputError(f"epsilon must be in [0, 1], got {config.epsilon}")
    if not 0.0 <= config.min_weight * len(arms) <= 1.0:
        raise PolicyInputError(f"min_weight {config.min_weight} x {len(arms)} variants exceeds 1")
    if config.reward_model not in (BINARY, GAUSSIAN):
        raise PolicyInputError(f"reward_model must be {BINARY!r} or {GAUSSIAN!r}, got {config.reward_model!r}")
    for arm in arms:
        values = (arm.initial_weight, arm.reward_sum, arm.reward_sq_sum)
        if not all(math.isfinite(v) for v in values):
            raise PolicyInputError(f"variant {arm.name!r} has a non-finite statistic: {values}")
        if arm.invocations < 0 or arm.initial_weight < 0 or arm.reward_sq_sum < 0:
            raise PolicyInputError(f"variant {arm.name!r} has a negative count or weight")
        if config.reward_model == BINARY and not 0.0 <= arm.reward_sum <= arm.invocations:
            raise PolicyInputError(
                f"variant {arm.name!r}: reward sum {arm.reward_sum} is outside [0, invocations={arm.invocations}]; "
                "binary rewards need 0 <= reward <= 1 per invocation (use reward_model 'gaussian' for others)"
            )
    if sum(a.initial_weight for a in arms) <= 0:
        raise PolicyInputError("the initial weights are all zero")


def _normalise(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def _share_best(arms: list[ArmStats], scores: dict[str, float]) -> dict[str, float]:
    best = max(scores.values())
    winners = [a.name for a in arms if scores[a.name] == best]
    return {a.name: (1.0 / len(winners) if a.name in winners else 0.0) for a in arms}


def apply_floor(weights: dict[str, float], min_weight: float) -> dict[str, float]:
    """Every arm gets at least ``min_weight``; the rest is shared in proportion to ``weights``."""
    if min_weight <= 0:
        return weights
    spare = 1.0 - min_weight * len(weights)
    return {name: min_weight + spare * w for name, w in weights.items()}


def stats_seed(arms: list[ArmStats], seed: int) -> int:
    """A seed derived from the statistics: the same data always gives the same Thompson weights."""
    text = repr((seed, [(a.name, a.invocations, a.reward_sum, a.reward_sq_sum) for a in arms]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


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


def allocate(arms: list[ArmStats], config: PolicyConfig) -> Allocation:
    """Allocation weights for ``arms`` under ``config``. Raises ``PolicyInputError`` on impossible input."""
    _check(arms, config)
    initial = _normalise({a.name: a.initial_weight for a in arms})
    if len(arms) == 1:
        return Allocation({arms[0].name: 1.0}, config.strategy, {"reason": "one variant"})
    if config.strategy == "WeightedSampling":
        return Allocation(apply_floor(initial, config.min_weight), "WeightedSampling", {})
    if any(a.invocations < config.warmup for a in arms):
        counts = {a.name: a.invocations for a in arms}
        return Allocation(apply_floor(initial, config.min_weight), "warmup", {"invocations": counts,
                                                                             "warmup": config.warmup})
    means = {a.name: a.mean for a in arms}
    if config.strategy == "EpsilonGreedy":
        greedy = _share_best(arms, means)
        share = config.epsilon / len(arms)
        weights = {name: (1.0 - config.epsilon) * w + share for name, w in greedy.items()}
        detail = {"means": means}
    elif config.strategy == "UCB1":
        total = sum(a.invocations for a in arms)
        scores = {
            a.name: (math.inf if a.invocations == 0 else a.mean + math.sqrt(2.0 * math.log(total) / a.invocations))
            for a in arms
        }
        weights = _share_best(arms, scores)
        detail = {"means": means, "scores": {k: (v if math.isfinite(v) else None) for k, v in scores.items()}}
    elif config.strategy == "ThompsonSampling":
        rng = np.random.default_rng(stats_seed(arms, config.seed))
        weights = thompson_probabilities(arms, config.reward_model, rng)
        detail = {"means": means, "p_best": dict(weights), "draws": THOMPSON_DRAWS}
    else:
        raise PolicyInputError(f"unknown strategy {config.strategy!r}")
    return Allocation(apply_floor(weights, config.min_weight), config.strategy, detail)
