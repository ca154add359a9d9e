"""Sequential tests: look at the results as often as you like without inflating false positives.

- ``WaldSPRT``: Wald's sequential probability ratio test for one binary metric,
  H0: p = p0 against H1: p = p1, with boundaries A = (1 − β)/α and B = β/(1 − α).
- ``msprt``: the mixture SPRT of Johari, Pekelis and Walsh ("Always valid
  inference", 2017) for a difference of means or rates between two groups,
  with a normal mixing distribution N(0, τ²) over the true difference. It gives
  an always-valid p-value and confidence sequence: the chance that it *ever*
  rejects a true null, however often it is checked, is at most α.
  τ is the tuning parameter: the scale of differences you expect (a good
  default is the minimum effect you care about); the test is valid for any τ,
  and powerful near it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bandit_service.stats.frequentist import Interval, StatsInputError

CONTINUE, ACCEPT_H0, ACCEPT_H1 = "continue", "accept H0", "accept H1"


@dataclass(frozen=True)
class WaldSPRT:
    p0: float
    p1: float
    alpha: float = 0.05
    beta: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.p0 < 1 and 0 < self.p1 < 1) or self.p0 == self.p1:
            raise StatsInputError(f"p0 and p1 must differ and lie in (0, 1), got {self.p0}, {self.p1}")
        if not (0 < self.alpha < 1 and 0 < self.beta < 1):
            raise StatsInputError("alpha and beta must be in (0, 1)")

    @property
    def bounds(self) -> tuple[float, float]:
        """(log B, log A): accept H0 at or below the first, H1 at or above the second."""
        return math.log(self.beta / (1 - self.alpha)), math.log((1 - self.beta) / self.alpha)

    def log_likelihood_ratio(self, successes: int, n: int) -> float:
        return (successes * math.log(self.p1 / self.p0)
                + (n - successes) * math.log((1 - self.p1) / (1 - self.p0)))

    def decide(self, successes: int, n: int) -> str:
        lower, upper = self.bounds
        llr = self.log_likelihood_ratio(successes, n)
        if llr >= upper:
            return ACCEPT_H1
        if llr <= lower:
            return ACCEPT_H0
        return CONTINUE


@dataclass(frozen=True)
class MSPRTResult:
    difference: float
    variance: float  # of the difference estimate
    likelihood_ratio: float
    p_value: float  # always valid at this look (take the running minimum across looks)
    interval: Interval  # always-valid confidence sequence at this look


def msprt(difference: float, variance: float, tau: float, alpha: float = 0.05) -> MSPRTResult:
    """Mixture SPRT at one look: ``difference`` = estimate of B − A, ``variance`` its variance (σ²_A/n_A + σ²_B/n_B)."""
    if variance <= 0 or tau <= 0:
        raise StatsInputError("variance and tau must be positive")
    v, t2 = variance, tau * tau
    log_ratio = 0.5 * math.log(v / (v + t2)) + difference**2 * t2 / (2 * v * (v + t2))
    ratio = math.exp(min(log_ratio, 700.0))
    half_width = math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) - 2 * math.log(alpha)))
    return MSPRTResult(difference, variance, ratio, min(1.0, 1.0 / ratio),
                       Interval(difference, difference - half_width, difference + half_width, 1 - alpha))
