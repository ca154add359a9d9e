"""Sequential tests, corrections for many metrics, and sample-ratio checks, verified by simulation (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest

from bandit_service.stats.checks import adjust_p_values, expected_shares_from_history, sample_ratio_mismatch
from bandit_service.stats.frequentist import StatsInputError
from bandit_service.stats.sequential import ACCEPT_H0, ACCEPT_H1, CONTINUE, WaldSPRT, msprt


def sprt_outcomes(test: WaldSPRT, true_p: float, runs: int, max_n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    lower, upper = test.bounds
    up, down = np.log(test.p1 / test.p0), np.log((1 - test.p1) / (1 - test.p0))
    llr = np.cumsum(np.where(rng.random((runs, max_n)) < true_p, up, down), axis=1)
    crossed_up = np.where((llr >= upper).any(axis=1), (llr >= upper).argmax(axis=1), max_n)
    crossed_down = np.where((llr <= lower).any(axis=1), (llr <= lower).argmax(axis=1), max_n)
    return {ACCEPT_H1: float((crossed_up < crossed_down).mean()), ACCEPT_H0: float((crossed_down < crossed_up).mean()),
            CONTINUE: float((crossed_up == crossed_down).mean())}


def test_sprt_error_rates_are_near_their_targets():
    test = WaldSPRT(p0=0.05, p1=0.08, alpha=0.05, beta=0.2)
    under_h0 = sprt_outcomes(test, 0.05, runs=2_000, max_n=6_000, seed=1)
    under_h1 = sprt_outcomes(test, 0.08, runs=2_000, max_n=6_000, seed=2)
    # Wald's bounds keep the errors at or a little below alpha and beta (at most alpha/(1-beta), beta/(1-alpha)).
    assert 0.02 <= under_h0[ACCEPT_H1] <= 0.0625 + 0.01
    assert 0.10 <= under_h1[ACCEPT_H0] <= 0.21 + 0.02
    assert under_h0[CONTINUE] < 0.01 and under_h1[CONTINUE] < 0.01
    assert test.decide(0, 10) == CONTINUE
    assert test.decide(0, 200) == ACCEPT_H0 and test.decide(40, 200) == ACCEPT_H1
    with pytest.raises(StatsInputError):
        WaldSPRT(0.05, 0.05)


def peeking(difference: float, runs: int, looks: int, per_look: int, seed: int, tau: float = 0.02):
    """Rates of rejection at any look: always-valid mSPRT, naive z-test; and confidence-sequence coverage."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    p_a, p_b = 0.10, 0.10 + difference
    a = rng.binomial(per_look, p_a, (runs, looks)).cumsum(axis=1)
    b = rng.binomial(per_look, p_b, (runs, looks)).cumsum(axis=1)
    n = per_look * np.arange(1, looks + 1)
    rate_a, rate_b = a / n, b / n
    variance = np.maximum(rate_a * (1 - rate_a) / n + rate_b * (1 - rate_b) / n, 1e-12)
    naive = (2 * stats.norm.sf(np.abs(rate_b - rate_a) / np.sqrt(variance)) < 0.05).any(axis=1).mean()
    always_valid = 0
    covered = 0
    for run in range(runs):
        rejected, inside = False, True
        for look in range(looks):
            result = msprt(rate_b[run, look] - rate_a[run, look], variance[run, look], tau=tau)
            rejected = rejected or result.p_value < 0.05
            inside = inside and result.interval.contains(difference)
        always_valid += rejected
        covered += inside
    return always_valid / runs, float(naive), covered / runs


def test_msprt_keeps_false_positives_at_alpha_under_continuous_peeking():
    always_valid, naive, coverage = peeking(0.0, runs=1_000, looks=50, per_look=200, seed=3)
    assert always_valid <= 0.05 + 0.015  # 1,000 A/A tests: standard error 0.007
    assert naive >= 0.15  # looking 50 times at a fixed-horizon test: several times alpha
    assert coverage >= 0.95 - 0.015


def test_msprt_detects_a_real_difference():
    power, _, coverage = peeking(0.02, runs=300, looks=50, per_look=200, seed=4)
    assert power >= 0.6
    assert coverage >= 0.93


def test_holm_and_benjamini_hochberg_match_their_definitions():
    rng = np.random.default_rng(5)
    for _ in range(100):
        p = {f"m{i}": float(x) for i, x in enumerate(rng.uniform(0, 0.2, rng.integers(1, 8)))}
        names = sorted(p, key=p.get)
        m = len(names)
        holm, running = {}, 0.0
        for rank, name in enumerate(names):
            running = max(running, min(1.0, (m - rank) * p[name]))
            holm[name] = running
        bh, running = {}, 1.0
        for rank in range(m - 1, -1, -1):
            running = min(running, p[names[rank]] * m / (rank + 1))
            bh[names[rank]] = running
        got_holm = adjust_p_values(p, "holm")
        got_bh = adjust_p_values(p, "benjamini-hochberg")
        for name in p:
            assert got_holm[name][0] == pytest.approx(holm[name])
            assert got_bh[name][0] == pytest.approx(bh[name])
            assert got_holm[name][1] == (holm[name] <= 0.05)
    with pytest.raises(StatsInputError):
        adjust_p_values({"a": 0.01}, "bonferroni-ish")


def test_sample_ratio_mismatch_with_changing_weights():
    history = [(10_000, {"A": 0.5, "B": 0.5}), (30_000, {"A": 0.2, "B": 0.8})]
    shares = expected_shares_from_history(history)
    assert shares == pytest.approx({"A": (5_000 + 6_000) / 40_000, "B": (5_000 + 24_000) / 40_000})
    rng = np.random.default_rng(6)
    false_alarms = 0
    for _ in range(2_000):
        a = rng.binomial(10_000, 0.5) + rng.binomial(30_000, 0.2)
        false_alarms += sample_ratio_mismatch({"A": int(a), "B": 40_000 - int(a)}, shares, threshold=0.05).mismatch
    assert false_alarms / 2_000 == pytest.approx(0.05, abs=0.015)
    # Pooling the periods naively (a 50/50 expectation) would cry wolf; a real 1 % shortfall is caught.
    assert sample_ratio_mismatch({"A": 11_000, "B": 29_000}, {"A": 0.5, "B": 0.5}).mismatch
    broken = sample_ratio_mismatch({"A": 10_560, "B": 29_440}, shares)
    assert broken.mismatch and broken.p_value < 0.001
    with pytest.raises(StatsInputError):
        sample_ratio_mismatch({"A": 0, "B": 0}, shares)
