"""Allocation policies: per-variant statistics in, allocation weights (probabilities summing to 1) out.

Every strategy is a ``Policy`` (``strategies``) behind one function,
``allocate``, which runs the steps they share (``base``): the input checks,
one variant gets everything, the initial weights until each arm has
``warmup`` invocations, and at least ``min_weight`` per arm afterwards.
Pure and seeded: no I/O, and the same statistics with the same seed give the
same weights.
"""

from __future__ import annotations

from abflow.core.config import STRATEGIES
from bandit_service.policies.base import (
    BINARY,
    GAUSSIAN,
    Allocation,
    ArmStats,
    Policy,
    PolicyConfig,
    PolicyInputError,
    apply_floor,
    check_input,
    normalise,
)
from bandit_service.policies.strategies import UCB1, EpsilonGreedy, ThompsonSampling, WeightedSampling, thompson_probabilities

POLICIES: dict[str, Policy] = {p.name: p for p in (WeightedSampling(), EpsilonGreedy(), UCB1(), ThompsonSampling())}
# The config's strategy names (a public contract, kept in the kernel) and the policies must agree.
if tuple(POLICIES) != STRATEGIES:
    raise ImportError(f"policies {tuple(POLICIES)} do not match the config's strategies {STRATEGIES}")


def allocate(arms: list[ArmStats], config: PolicyConfig) -> Allocation:
    """Allocation weights for ``arms`` under ``config``. Raises ``PolicyInputError`` on impossible input."""
    check_input(arms, config)
    policy = POLICIES[config.strategy]
    initial = normalise({a.name: a.initial_weight for a in arms})
    if len(arms) == 1:
        return Allocation({arms[0].name: 1.0}, config.strategy, {"reason": "one variant"})
    if policy.uses_warmup and any(a.invocations < config.warmup for a in arms):
        counts = {a.name: a.invocations for a in arms}
        return Allocation(apply_floor(initial, config.min_weight), "warmup",
                          {"invocations": counts, "warmup": config.warmup})
    weights, detail = policy.weights(arms, config)
    return Allocation(apply_floor(weights, config.min_weight), config.strategy, detail)


__all__ = ["BINARY", "GAUSSIAN", "POLICIES", "Allocation", "ArmStats", "Policy", "PolicyConfig", "PolicyInputError",
           "allocate", "apply_floor", "thompson_probabilities"]
