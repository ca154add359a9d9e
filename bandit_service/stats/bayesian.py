"""Beta-Binomial comparison of two rates: P(B beats A), expected loss, credible intervals.

Posteriors are Beta(prior_a + successes, prior_b + failures) with a uniform
Beta(1, 1) prior by default. P(B > A) uses the exact finite sum (Evan Miller's
formula) when B's posterior alpha is small enough, else numerical integration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import integrate, special, stats

from bandit_service.stats.frequentist import Interval, _check_counts

EXACT_SUM_LIMIT = 5_000  # terms of the exact sum; beyond, integrate numerically


@dataclass(frozen=True)
class BetaPosterior:
    alpha: float
    beta: float

    @classmethod
    def from_counts(cls, successes: int, n: int, prior_alpha: float = 1.0, prior_beta: float = 1.0) -> "BetaPosterior":
        _check_counts(successes, n, "")
        return cls(prior_alpha + successes, prior_beta + n - successes)

    @property
    def distribution(self):
        return stats.beta(self.alpha, self.beta)

    def credible_interval(self, level: float = 0.95) -> Interval:
        """Equal-tailed credible interval of the rate."""
        low, high = self.distribution.ppf([0.5 - level / 2, 0.5 + level / 2])
        return Interval(self.alpha / (self.alpha + self.beta), float(low), float(high), level)


def prob_b_beats_a(a: BetaPosterior, b: BetaPosterior) -> float:
    """P(rate_B > rate_A) under independent Beta posteriors."""
    if float(b.alpha).is_integer() and b.alpha <= EXACT_SUM_LIMIT:
        # sum_{i=0}^{alpha_B - 1} B(alpha_A + i, beta_A + beta_B) / ((beta_B + i) B(1 + i, beta_B) B(alpha_A, beta_A))
        i = np.arange(int(b.alpha))
        log_terms = (special.betaln(a.alpha + i, a.beta + b.beta) - np.log(b.beta + i)
                     - special.betaln(1 + i, b.beta) - special.betaln(a.alpha, a.beta))
        return float(min(max(np.exp(special.logsumexp(log_terms)), 0.0), 1.0))
    da, db = a.distribution, b.distribution
    lo = min(da.ppf(1e-12), db.ppf(1e-12))
    hi = max(da.ppf(1 - 1e-12), db.ppf(1 - 1e-12))
    value, _ = integrate.quad(lambda x: db.pdf(x) * da.cdf(x), lo, hi, limit=500, points=[da.mean(), db.mean()])
    return float(min(max(value, 0.0), 1.0))


def expected_loss(a: BetaPosterior, b: BetaPosterior) -> tuple[float, float]:
    """(loss of choosing A, loss of choosing B): E[max(B − A, 0)] and E[max(A − B, 0)], in rate units."""
    mean_a = a.alpha / (a.alpha + a.beta)
    mean_b = b.alpha / (b.alpha + b.beta)
    # E[max(B - A, 0)] = E[B 1{B>A}] - E[A 1{B>A}], each a P(beats) of a shifted posterior.
    e_b = mean_b * prob_b_beats_a(a, BetaPosterior(b.alpha + 1, b.beta))
    e_a = mean_a * prob_b_beats_a(BetaPosterior(a.alpha + 1, a.beta), b)
    loss_choosing_a = max(e_b - e_a, 0.0)
    loss_choosing_b = max(loss_choosing_a - (mean_b - mean_a), 0.0)
    return loss_choosing_a, loss_choosing_b
