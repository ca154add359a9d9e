"""Corrections for many metrics, and the sample-ratio mismatch check."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bandit_service.stats.frequentist import StatsInputError

CORRECTIONS = {"holm": "holm", "benjamini-hochberg": "fdr_bh"}


def adjust_p_values(p_values: dict[str, float], method: str = "holm", alpha: float = 0.05) -> dict[str, tuple[float, bool]]:
    """Adjusted p-value and decision per metric: Holm–Bonferroni (family-wise error) or Benjamini–Hochberg (FDR)."""
    if method not in CORRECTIONS:
        raise StatsInputError(f"method must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    if not p_values:
        return {}
    names = list(p_values)
    reject, adjusted, _, _ = multipletests([p_values[n] for n in names], alpha=alpha, method=CORRECTIONS[method])
    return {n: (float(a), bool(r)) for n, a, r in zip(names, adjusted, reject)}


@dataclass(frozen=True)
class SampleRatioCheck:
    observed: dict[str, int]
    expected: dict[str, float]
    statistic: float
    p_value: float
    mismatch: bool


def expected_shares_from_history(periods: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Expected share per variant when the weights changed: each period's assignments times its weights.

    ``periods``: (assignments made while the weights held, those weights).
    """
    totals: dict[str, float] = {}
    for count, weights in periods:
        norm = sum(weights.values())
        for name, weight in weights.items():
            totals[name] = totals.get(name, 0.0) + count * weight / norm
    grand = sum(totals.values())
    if grand <= 0:
        raise StatsInputError("no assignments in the history")
    return {name: value / grand for name, value in totals.items()}


def sample_ratio_mismatch(observed: dict[str, int], expected_shares: dict[str, float],
                          threshold: float = 0.001) -> SampleRatioCheck:
    """Chi-square goodness of fit of the observed counts to the expected shares (mismatch below ``threshold``).

    Units in a variant whose expected share is 0 (or that is not expected at all) cannot happen
    under the design: any of them is a mismatch, whatever the other counts say.
    """
    names = list(dict.fromkeys([*expected_shares, *observed]))
    shares = {n: float(expected_shares.get(n, 0.0)) for n in names}
    counts = {n: int(observed.get(n, 0)) for n in names}
    if any(share < 0 for share in shares.values()):
        raise StatsInputError("expected shares must not be negative")
    if sum(counts.values()) == 0:
        raise StatsInputError("no observations")
    if any(counts[n] > 0 and shares[n] == 0 for n in names):
        return SampleRatioCheck(counts, shares, math.inf, 0.0, True)
    possible = [n for n in names if shares[n] > 0]
    if not possible:
        raise StatsInputError("every expected share is 0")
    expected = np.array([shares[n] for n in possible])
    observed_counts = np.array([counts[n] for n in possible], dtype=float)
    statistic, p_value = stats.chisquare(observed_counts, observed_counts.sum() * expected / expected.sum())
    return SampleRatioCheck(counts, shares, float(statistic), float(p_value), bool(p_value < threshold))
