"""What every allocation policy shares: the statistics in (``ArmStats``), the parameters
(``PolicyConfig``, checked by the same rules as the experiment config), the weights out
(``Allocation``), the ``Policy`` interface and the helpers the strategies use. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from abflow.core.config import ConfigError, check_policy_parameters
from abflow.core.errors import Invalid

BINARY = "binary"
GAUSSIAN = "gaussian"


class PolicyInputError(Invalid):
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


def check_input(arms: list[ArmStats], config: PolicyConfig) -> None:
    if not arms:
        raise PolicyInputError("no variants")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise PolicyInputError(f"variant names repeat: {names}")
    try:
        check_policy_parameters(config.strategy, config.epsilon, config.min_weight, config.reward_model, len(arms))
    except ConfigError as exc:
        raise PolicyInputError(str(exc)) from None
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


def normalise(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def share_best(arms: list[ArmStats], scores: dict[str, float]) -> dict[str, float]:
    best = max(scores.values())
    winners = [a.name for a in arms if scores[a.name] == best]
    return {a.name: (1.0 / len(winners) if a.name in winners else 0.0) for a in arms}


def apply_floor(weights: dict[str, float], min_weight: float) -> dict[str, float]:
    """Every arm gets at least ``min_weight``; arms above it keep their proportions in what is left.

    A floor, not a mixture: weights already above it do not move (initial weights of 40/30/30 stay
    40/30/30 under a floor of 0.05; a mixture gave 39/30.5/30.5)."""
    if min_weight <= 0:
        return dict(weights)
    floored: set[str] = set()
    while True:
        spare = 1.0 - min_weight * len(floored)
        free = {name: w for name, w in weights.items() if name not in floored}
        if not free:  # min_weight × arms = 1: every arm at the floor
            return {name: 1.0 / len(weights) for name in weights}
        total = sum(free.values())
        scaled = {name: spare * w / total if total > 0 else spare / len(free) for name, w in free.items()}
        below = {name for name, w in scaled.items() if w < min_weight}
        if not below:
            return {name: min_weight if name in floored else scaled[name] for name in weights}
        floored |= below


def stats_seed(arms: list[ArmStats], seed: int) -> int:
    """A seed derived from the statistics: the same data always gives the same Thompson weights."""
    text = repr((seed, [(a.name, a.invocations, a.reward_sum, a.reward_sq_sum) for a in arms]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Policy(ABC):
    """One allocation rule. ``allocate`` (in this package's ``__init__``) runs the shared steps around it."""

    name: str  # the ``strategy`` of the experiment config
    uses_warmup = True  # serve the initial weights until every arm has ``warmup`` invocations

    @abstractmethod
    def weights(self, arms: list[ArmStats], config: PolicyConfig) -> tuple[dict[str, float], dict]:
        """The weights before the minimum-weight floor, and what the rule saw (for the allocations history)."""
