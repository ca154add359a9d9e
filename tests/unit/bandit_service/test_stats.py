"""Statistics verified against independent computations, scipy/statsmodels, and by simulation (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from bandit_service.stats.bayesian import BetaPosterior, expected_loss, prob_b_beats_a
from bandit_service.stats.frequentist import (
    MeanSummary,
    StatsInputError,
    chi_square_test,
    mcnemar_test,
    mean_difference_interval,
    paired_rate_difference_interval,
    rate_difference_interval,
    rate_lift_interval,
    relative_lift_interval,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)
from bandit_service.stats.power import (
    mde_proportions,
    power_proportions,
    sample_size_means,
    sample_size_proportions,
)

RNG = np.random.default_rng(2026)


def random_counts(count: int):
    for _ in range(count):
        n_a, n_b = RNG.integers(20, 20_000, size=2)
        p_a, p_b = RNG.uniform(0.01, 0.6, size=2)
        yield int(RNG.binomial(n_a, p_a)), int(n_a), int(RNG.binomial(n_b, p_b)), int(n_b)


def test_z_test_matches_the_pooled_formula_and_the_uncorrected_chi_square():
    for s_a, n_a, s_b, n_b in random_counts(300):
        result = two_proportion_z_test(s_a, n_a, s_b, n_b)
        pooled = (s_a + s_b) / (n_a + n_b)
        z = (s_b / n_b - s_a / n_a) / math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        assert result.statistic == pytest.approx(z, rel=1e-9)
        chi = chi_square_test(s_a, n_a, s_b, n_b, correction=False)
        assert chi.statistic == pytest.approx(z * z, rel=1e-9)  # z² = χ² on a 2x2 table
        assert chi.p_value == pytest.approx(result.p_value, rel=1e-6, abs=1e-12)
        larger = two_proportion_z_test(s_a, n_a, s_b, n_b, alternative="larger").p_value
        assert larger == pytest.approx(stats.norm.sf(z), rel=1e-6, abs=1e-12)
        assert chi_square_test(s_a, n_a, s_b, n_b).statistic <= chi.statistic + 1e-12  # Yates shrinks it


def test_welch_from_summaries_matches_scipy_on_the_raw_data():
    for _ in range(200):
        a = RNG.normal(RNG.uniform(-5, 5), RNG.uniform(0.1, 10), RNG.integers(2, 500))
        b = RNG.normal(RNG.uniform(-5, 5), RNG.uniform(0.1, 10), RNG.integers(2, 500))
        summary_a = MeanSummary(len(a), float(a.sum()), float((a ** 2).sum()))
        summary_b = MeanSummary(len(b), float(b.sum()), float((b ** 2).sum()))
        expected = stats.ttest_ind(b, a, equal_var=False)
        got = welch_t_test(summary_a, summary_b)
        assert got.statistic == pytest.approx(expected.statistic, rel=1e-6)
        assert got.p_value == pytest.approx(expected.pvalue, rel=1e-5, abs=1e-12)
        interval = mean_difference_interval(summary_a, summary_b)
        ci = expected.confidence_interval(0.95)
        assert (interval.low, interval.high) == pytest.approx((ci.low, ci.high), rel=1e-6)


def test_wilson_interval_matches_its_closed_form():
    for successes, n in [(0, 10), (10, 10), (3, 7), (45, 1000), (999, 1000)]:
        z = stats.norm.ppf(0.975)
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        interval = wilson_interval(successes, n)
        assert (interval.low, interval.high) == pytest.approx((centre - half, centre + half), abs=1e-12)
        assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0


def coverage(make_interval, truth: float, simulations: int, draw) -> float:
    hits = sum(make_interval(*draw()).contains(truth) for _ in range(simulations))
    return hits / simulations


def test_interval_coverage_is_near_nominal_by_simulation():
    rng = np.random.default_rng(7)
    p_a, p_b, n = 0.05, 0.06, 2_000
    draw_one = lambda: (int(rng.binomial(400, 0.05)), 400)  # noqa: E731
    draw_two = lambda: (int(rng.binomial(n, p_a)), n, int(rng.binomial(n, p_b)), n)  # noqa: E731
    wilson = coverage(wilson_interval, 0.05, 4_000, draw_one)
    difference = coverage(rate_difference_interval, p_b - p_a, 4_000, draw_two)
    lift = coverage(rate_lift_interval, p_b / p_a - 1, 4_000, draw_two)
    # 4,000 draws: a 95 % interval's coverage estimate has a standard error of 0.0034.
    for name, value in [("wilson", wilson), ("difference", difference), ("lift", lift)]:
        assert 0.935 <= value <= 0.965, (name, value)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs():
    for only_a, only_b in [(5, 1), (30, 6), (12, 12), (0, 9), (140, 100)]:
        expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_test(only_a, only_b).p_value == pytest.approx(expected, rel=1e-9)
    assert mcnemar_test(0, 0).p_value == 1.0


def paired_cells(rng, p_a: float, p_b: float, correlation: float, n: int) -> tuple[int, int, int, int]:
    """(both, only A, only B, n): n units, each with an event for A and for B, correlated."""
    both = p_a * p_b + correlation * math.sqrt(p_a * (1 - p_a) * p_b * (1 - p_b))
    cells = rng.multinomial(n, [both, p_a - both, p_b - both, 1 - p_a - p_b + both])
    return int(cells[0]), int(cells[1]), int(cells[2]), n


def test_paired_interval_covers_and_uses_the_pairing():
    rng = np.random.default_rng(11)
    # 4,000 draws per case: the coverage estimate's standard error is 0.0034. Newcombe's
    # interval is conservative when the pairs are strongly correlated, hence the higher ceiling.
    for p_a, p_b, correlation, n in [(0.05, 0.07, 0.3, 200), (0.01, 0.03, 0.0, 1_000), (0.02, 0.05, 0.6, 2_000),
                                     (0.3, 0.2, 0.1, 100)]:
        value = coverage(paired_rate_difference_interval, p_b - p_a, 4_000,
                         lambda: paired_cells(rng, p_a, p_b, correlation, n))
        assert 0.935 <= value <= 0.98, (p_a, p_b, correlation, value)
    # On strongly correlated pairs it is much narrower than the interval for independent groups.
    both, only_a, only_b, n = paired_cells(np.random.default_rng(2), 0.1, 0.12, 0.8, 2_000)
    paired = paired_rate_difference_interval(both, only_a, only_b, n)
    unpaired = rate_difference_interval(both + only_a, n, both + only_b, n)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.high - paired.low < 0.6 * (unpaired.high - unpaired.low)
    with pytest.raises(StatsInputError, match="do not fit"):
        paired_rate_difference_interval(5, 5, 5, 10)


def test_bayesian_probability_exact_sum_integration_and_monte_carlo_agree():
    rng = np.random.default_rng(3)
    for s_a, n_a, s_b, n_b in [(45, 1000, 52, 1000), (0, 10, 3, 10), (500, 1000, 480, 1000), (3, 40, 3, 40)]:
        a, b = BetaPosterior.from_counts(s_a, n_a), BetaPosterior.from_counts(s_b, n_b)
        exact = prob_b_beats_a(a, b)
        # Nudging alpha off the integers forces the numerical integration path.
        integrated = prob_b_beats_a(a, BetaPosterior(b.alpha + 1e-9, b.beta))
        draws_a = rng.beta(a.alpha, a.beta, 400_000)
        draws_b = rng.beta(b.alpha, b.beta, 400_000)
        assert exact == pytest.approx(integrated, abs=1e-6)
        assert exact == pytest.approx(float((draws_b > draws_a).mean()), abs=0.004)
        loss_a, loss_b = expected_loss(a, b)
        assert loss_a == pytest.approx(float(np.maximum(draws_b - draws_a, 0).mean()), abs=3e-4)
        assert loss_b == pytest.approx(float(np.maximum(draws_a - draws_b, 0).mean()), abs=3e-4)
    assert prob_b_beats_a(BetaPosterior(1, 1), BetaPosterior(1, 1)) == pytest.approx(0.5)
    interval = BetaPosterior.from_counts(45, 1000).credible_interval(0.9)
    assert (interval.low, interval.high) == pytest.approx(stats.beta(46, 956).ppf([0.05, 0.95]))


def seed_001_sample_size(baseline_rate: float, mde: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The formula of seed 001, as written there (equal groups, two-sided)."""
    z_alpha, z_beta = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    treatment = baseline_rate + mde
    pooled = (baseline_rate + treatment) / 2
    return ((z_alpha * math.sqrt(2 * pooled * (1 - pooled))
             + z_beta * math.sqrt(baseline_rate * (1 - baseline_rate) + treatment * (1 - treatment))) ** 2 / mde ** 2)


def test_sample_size_for_rates_matches_seed_001_and_statsmodels():
    for p_a, lift in [(0.045, 0.003), (0.045, 0.007), (0.2, 0.02), (0.5, -0.05)]:
        n_a, n_b = sample_size_proportions(p_a, p_a + lift)
        assert n_a == n_b == math.ceil(seed_001_sample_size(p_a, lift))
        arcsine = NormalIndPower().solve_power(proportion_effectsize(p_a + lift, p_a), alpha=0.05, power=0.8)
        assert n_a == pytest.approx(arcsine, rel=0.03)  # a different approximation, within 3 %
    n_a, n_b = sample_size_proportions(0.1, 0.12, ratio=3)
    assert n_b == pytest.approx(3 * n_a, abs=3) and n_a < sample_size_proportions(0.1, 0.12)[0]
    assert sample_size_proportions(0.1, 0.12, two_sided=False)[0] < sample_size_proportions(0.1, 0.12)[0]


def test_power_and_mde_are_inverse_and_hold_by_simulation():
    n_a, n_b = sample_size_proportions(0.10, 0.12, ratio=1.5)
    assert power_proportions(0.10, 0.12, n_a, n_b) == pytest.approx(0.8, abs=0.002)
    assert mde_proportions(0.10, n_a, n_b) == pytest.approx(0.02, abs=2e-4)
    rng = np.random.default_rng(11)
    rejections = 0
    simulations = 3_000
    for _ in range(simulations):
        result = two_proportion_z_test(int(rng.binomial(n_a, 0.10)), n_a, int(rng.binomial(n_b, 0.12)), n_b)
        rejections += result.p_value < 0.05
    assert rejections / simulations == pytest.approx(0.8, abs=0.025)


def test_sample_size_for_means_holds_by_simulation():
    n_a, n_b = sample_size_means(difference=2.0, std=10.0, ratio=1.0)
    rng = np.random.default_rng(5)
    rejections = sum(stats.ttest_ind(rng.normal(2.0, 10, n_b), rng.normal(0, 10, n_a), equal_var=False).pvalue < 0.05
                     for _ in range(2_000))
    assert rejections / 2_000 == pytest.approx(0.8, abs=0.03)


def test_edge_cases_are_defined_or_clear_errors():
    assert two_proportion_z_test(0, 100, 0, 100).p_value == 1.0
    assert two_proportion_z_test(100, 100, 100, 100).p_value == 1.0
    assert wilson_interval(0, 5).low == 0.0
    assert wilson_interval(5, 5).high == pytest.approx(1.0)
    with pytest.raises(StatsInputError, match="empty"):
        two_proportion_z_test(0, 0, 1, 10)
    with pytest.raises(StatsInputError, match="outside"):
        wilson_interval(11, 10)
    with pytest.raises(StatsInputError, match="group A has no successes"):
        rate_lift_interval(0, 100, 5, 100)
    with pytest.raises(StatsInputError, match="group B has no successes"):  # was the zero-width [-1, -1]
        rate_lift_interval(5, 100, 0, 100)
    with pytest.raises(StatsInputError, match="undefined"):
        relative_lift_interval(0.0, 0.1, 1.0, 0.1)


def test_relative_lift_keeps_its_sign_when_the_baseline_is_negative():
    """(B − A) / |A|, as gbstats: from −10 to −5 is an improvement of +50 %, not B/A − 1 = −50 %."""
    lift = relative_lift_interval(-10.0, 0.25, -5.0, 0.25)
    assert lift.estimate == pytest.approx(0.5)
    assert lift.low < 0.5 < lift.high
    # The delta method's variance, Var(B)/A² + B² Var(A)/A⁴, does not depend on A's sign.
    se = np.sqrt(0.25 / 100 + 25 * 0.25 / 10_000)
    assert lift.high - lift.low == pytest.approx(2 * 1.959964 * se, rel=1e-6)
    assert relative_lift_interval(10.0, 0.25, 15.0, 0.25).estimate == pytest.approx(0.5)
    with pytest.raises(StatsInputError, match="at least 2"):
        welch_t_test(MeanSummary(1, 1.0, 1.0), MeanSummary(5, 5.0, 6.0))
    with pytest.raises(StatsInputError):
        sample_size_proportions(0.1, 0.1)


def test_the_always_valid_test_has_the_power_asked_at_the_sample_it_asks_for():
    """The decision ships on the mixture SPRT, so its minimum sample is that test's, not a
    fixed-horizon test's: at the fixed-horizon size it has about 41 % power, not 80 %."""
    from bandit_service.stats.power import msprt_power, sample_size_msprt
    from bandit_service.stats.sequential import msprt

    rng = np.random.default_rng(8)
    difference, sd, tau = 0.1, 1.0, 0.1
    n = sample_size_msprt(difference, sd**2, sd**2, tau)[0]
    fixed = sample_size_means(difference, sd)[0]
    assert 1.8 * fixed < n < 2.1 * fixed, (n, fixed)
    assert msprt_power(difference, 2 * sd**2 / fixed, tau) == pytest.approx(0.41, abs=0.01)
    for size, target in ((n, 0.8), (fixed, 0.41)):
        runs, rejected = 2_000, 0
        for _ in range(runs):
            a, b = rng.normal(0, sd, size), rng.normal(difference, sd, size)
            variance = a.var(ddof=1) / size + b.var(ddof=1) / size
            rejected += msprt(b.mean() - a.mean(), variance, tau).p_value < 0.05
        assert rejected / runs == pytest.approx(target, abs=0.03), (size, rejected / runs)
