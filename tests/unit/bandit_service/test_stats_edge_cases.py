"""Edge cases an independent check of the statistics found, each against scipy/statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import samplesize_proportions_2indep_onetail

from abflow.core.config import parse_config
from bandit_service.stats.checks import sample_ratio_mismatch
from bandit_service.stats.frequentist import MeanSummary, StatsInputError, welch_t_test
from bandit_service.stats.guardrails import mann_whitney_from_histograms
from bandit_service.stats.power import mde_proportions, sample_size_proportions


def summary(values) -> MeanSummary:
    values = np.asarray(values, dtype=float)
    return MeanSummary(len(values), float(values.sum()), float((values**2).sum()))


@pytest.mark.parametrize("value", [0.1, 3.3, 1234.567, 1e-7])
def test_a_constant_group_has_zero_variance(value):
    assert summary([value] * 1000).variance == 0.0


def test_two_constant_groups_are_an_error_not_a_huge_t():
    with pytest.raises(StatsInputError, match="zero variance"):
        welch_t_test(summary([0.1] * 500), summary([0.1] * 700))


def test_small_real_spread_is_kept():
    values = 1000.0 + np.random.default_rng(1).normal(0, 0.1, 500)  # a coefficient of variation of 1e-4
    assert summary(values).variance == pytest.approx(np.var(values, ddof=1), rel=1e-4)


def test_mann_whitney_with_every_value_in_one_bucket_matches_scipy():
    hist_a, hist_b = [0, 7, 0], [0, 5, 0]
    result = mann_whitney_from_histograms(hist_a, hist_b)
    expected = stats.mannwhitneyu([1] * 5, [1] * 7, alternative="two-sided", method="asymptotic")
    assert result.statistic == pytest.approx(expected.statistic) == 7 * 5 / 2
    assert result.p_value == pytest.approx(expected.pvalue)


def test_units_in_a_variant_that_should_get_none_are_a_mismatch():
    check = sample_ratio_mismatch({"A": 5_000, "B": 5_000, "Old": 2_000}, {"A": 0.5, "B": 0.5, "Old": 0.0})
    assert check.mismatch and check.p_value == 0.0 and math.isinf(check.statistic)
    unexpected = sample_ratio_mismatch({"A": 5_000, "B": 5_000, "Ghost": 1}, {"A": 0.5, "B": 0.5})
    assert unexpected.mismatch


def test_a_zero_share_variant_without_units_is_left_out():
    check = sample_ratio_mismatch({"A": 5_030, "B": 4_970}, {"A": 0.5, "B": 0.5, "Old": 0.0})
    _, p_value = stats.chisquare([5_030, 4_970])
    assert not check.mismatch and check.p_value == pytest.approx(p_value)


def test_sample_size_at_a_power_below_alpha_is_zero_as_statsmodels_says():
    assert samplesize_proportions_2indep_onetail(0.02, 0.1, 0.01) == 0
    assert sample_size_proportions(0.1, 0.12, power=0.01) == (0, 0)
    # The usual case is untouched, and agrees with statsmodels.
    assert sample_size_proportions(0.1, 0.12, power=0.8)[0] == math.ceil(
        samplesize_proportions_2indep_onetail(0.02, 0.1, 0.8))


def test_mde_at_a_power_below_alpha_is_a_clear_error():
    with pytest.raises(StatsInputError, match="power 0.01 is below"):
        mde_proportions(0.1, 1_000, 1_000, power=0.01)


def test_correction_bh_is_accepted_as_benjamini_hochberg():
    config = parse_config({"experiment_id": "x", "strategy": "UCB1", "variants": [{"name": "A"}, {"name": "B"}],
                           "analysis": {"correction": "bh"}})
    assert config.analysis.correction == "benjamini-hochberg"
