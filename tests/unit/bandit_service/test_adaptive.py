"""Estimates under adaptive allocation (stratified by allocation period), the decision rules, and
the metrics/analysis config. Pure: no broker, no database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from abflow.core.config import ConfigError, parse_config
from bandit_service.policies import PolicyConfig
from bandit_service.simulation import simulate_adaptive_estimates
from bandit_service.stats.adaptive import (
    merge_thin_periods,
    period_index,
    period_starts,
    pooled,
    rate_cell,
    stratified_means,
)
from bandit_service.stats.decision import (
    DO_NOT_SHIP,
    KEEP_RUNNING,
    SHIP,
    STOP_FOR_HARM,
    ChallengerEvidence,
    GuardrailEvidence,
    decide,
)
from bandit_service.stats.frequentist import MeanSummary, StatsInputError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_period_starts_ignore_small_weight_moves():
    initial = {"A": 0.5, "B": 0.5}
    versions = [(T0 + timedelta(minutes=i), weights) for i, weights in enumerate([
        {"A": 0.5, "B": 0.5},  # warm-up: the same weights
        {"A": 0.47, "B": 0.53},  # under the tolerance
        {"A": 0.3, "B": 0.7},  # a new period
        {"A": 0.28, "B": 0.72},
        {"A": 0.1, "B": 0.9},  # another
    ])]
    starts = period_starts(initial, versions, tolerance=0.05)
    assert starts == [T0 + timedelta(minutes=2), T0 + timedelta(minutes=4)]
    assert period_index(starts, T0) == 0
    assert period_index(starts, T0 + timedelta(minutes=2)) == 1  # a window starting at the change is in the new one
    assert period_index(starts, T0 + timedelta(minutes=3, seconds=59)) == 1
    assert period_index(starts, T0 + timedelta(days=1)) == 2


def test_thin_periods_merge_into_their_neighbour():
    periods = [{"A": rate_cell(1, 1), "B": rate_cell(3, 10)},  # A has 1: merged forward
               {"A": rate_cell(2, 20), "B": rate_cell(4, 30)},
               {"A": rate_cell(0, 1), "B": rate_cell(5, 50)}]  # A has 1: merged backward
    merged = merge_thin_periods(periods, ["A", "B"])
    assert len(merged) == 1
    assert merged[0]["A"] == MeanSummary(22, 3.0, 3.0) and merged[0]["B"].n == 90
    with pytest.raises(StatsInputError):
        merge_thin_periods([{"A": rate_cell(0, 1), "B": rate_cell(1, 5)}], ["A", "B"])


def test_one_period_is_the_pooled_estimate():
    period = {"A": MeanSummary(100, 12.0, 30.0), "B": MeanSummary(50, 9.0, 20.0)}
    means = stratified_means([period], [150], ["A"])
    assert means["A"].mean == pytest.approx(0.12)
    assert means["A"].variance == pytest.approx(period["A"].variance / 100)
    # Each arm keeps its own variance in a comparison too (Welch, not the pooled t): a variance
    # pooled over both arms is too small when the smaller arm is the noisier one.
    two = stratified_means([period], [150], ["A", "B"])
    assert two["A"].variance == pytest.approx(period["A"].variance / 100)
    assert two["B"].variance == pytest.approx(period["B"].variance / 50)


def test_a_cell_too_thin_for_its_own_variance_is_never_taken_as_certain():
    """A bandit can leave an arm a handful of units in a period, all without a conversion: their
    own variance is 0. Such a cell takes the period's pooled variance when that is larger."""
    thin = {"A": rate_cell(40, 400), "B": rate_cell(0, 5)}
    means = stratified_means([thin], [405], ["A", "B"])
    together = thin["A"] + thin["B"]
    assert thin["B"].variance == 0 and means["B"].variance == pytest.approx(together.variance / 5)
    # A thin cell whose own variance is the larger keeps its own.
    noisy = {"A": MeanSummary(400, 40.0, 40.0), "B": MeanSummary(5, 10.0, 100.0)}
    means = stratified_means([noisy], [405], ["A", "B"])
    assert means["B"].variance == pytest.approx(noisy["B"].variance / 5)


def test_periods_are_weighted_by_their_traffic_not_by_the_variants_share():
    periods = [{"A": rate_cell(45, 900), "B": rate_cell(5, 100)},  # 5 % for both
               {"A": rate_cell(10, 100), "B": rate_cell(90, 900)}]  # 10 % for both
    means = stratified_means(periods, [1000, 1000], ["A", "B"])
    assert means["A"].mean == pytest.approx(0.075) and means["B"].mean == pytest.approx(0.075)
    naive = pooled(periods)
    assert naive["B"].mean - naive["A"].mean == pytest.approx(0.095 - 0.055)


def test_naive_pooling_is_biased_under_moving_weights_and_stratification_is_not():
    """The bandit moves traffic to the challenger while the conversion rate rises: an A/A test."""
    checks = simulate_adaptive_estimates([0.04, 0.05, 0.07, 0.10], 0.0, [0.5, 0.7, 0.85, 0.9], 5_000, 1_000, seed=1)
    naive, stratified = checks["naive"], checks["stratified"]
    assert naive.bias > 0.015 and naive.coverage < 0.05 and naive.false_positive_rate > 0.9
    assert abs(stratified.bias) < 0.0005
    assert 0.93 <= stratified.coverage <= 0.97
    assert stratified.false_positive_rate <= 0.07


def test_stratified_estimate_under_a_thompson_bandit():
    """Weights chosen by Thompson sampling from the data so far (with a 5 % floor), rates drifting up,
    a true lift of one point."""
    rates = [0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11]
    config = PolicyConfig("ThompsonSampling", warmup=100, min_weight=0.05)
    checks = simulate_adaptive_estimates(rates, 0.01, config, 2_500, 300, seed=4)
    assert checks["naive"].coverage < 0.1
    assert abs(checks["stratified"].bias) < 0.002
    assert checks["stratified"].coverage >= 0.92


def test_a_bandit_without_a_floor_starves_an_arm_and_the_thin_cells_stay_honest():
    """Thompson sampling with no min_weight leaves the losing arm a handful of units in late periods,
    often without a conversion. Each cell's own variance alone (0 there) covered 54 % with 46 % false
    positives in this A/A; a thin cell's variance is never below its period's pooled one."""
    rates = [0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11]
    config = PolicyConfig("ThompsonSampling", warmup=100, min_weight=0.0)
    stratified = simulate_adaptive_estimates(rates, 0.0, config, 2_500, 300, seed=4)["stratified"]
    assert stratified.coverage >= 0.93, stratified
    assert stratified.false_positive_rate <= 0.05 + 0.03, stratified


def guard(metric="error_rate", excess=0.0, low=-0.01, high=0.005, margin=0.01) -> GuardrailEvidence:
    return GuardrailEvidence(metric, margin, excess, low, high)


def challenger(name="B", n=50_000, improvement=0.01, low=0.004, high=0.016, p=0.001, guardrails=None):
    return ChallengerEvidence(name, n, improvement, low, high, p, tuple(guardrails or (guard(),)))


def test_decision_rules():
    ship = decide("A", 50_000, [challenger()], 0.05, 30_000, 0.005)
    assert ship.verdict == SHIP and ship.variant == "B"

    small = decide("A", 10_000, [challenger()], 0.05, 30_000, 0.005)
    assert small.verdict == KEEP_RUNNING and "10,000 of the 30,000" in small.reasons[1]

    unproven = decide("A", 50_000, [challenger(guardrails=[guard(high=0.02)])], 0.05, 30_000, 0.005)
    assert unproven.verdict == KEEP_RUNNING and "error_rate" in unproven.reasons[1]

    harm = decide("A", 100, [challenger(n=100, guardrails=[guard(excess=0.05, low=0.03, high=0.07)])], 0.05, 30_000,
                  0.005)
    assert harm.verdict == STOP_FOR_HARM and harm.variant == "B"  # harm does not wait for the sample

    srm = decide("A", 50_000, [challenger()], 0.05, 30_000, 0.005, srm_mismatch=True)
    assert srm.verdict == DO_NOT_SHIP and "sample-ratio" in srm.reasons[0]

    worse = decide("A", 50_000, [challenger(improvement=-0.01, low=-0.016, high=-0.004)], 0.05, 30_000, 0.005)
    assert worse.verdict == DO_NOT_SHIP

    futile = decide("A", 50_000, [challenger(improvement=0.001, low=-0.002, high=0.004, p=0.6)], 0.05, 30_000, 0.005)
    assert futile.verdict == DO_NOT_SHIP and "MDE" in futile.reasons[0]

    open_question = decide("A", 5_000, [challenger(improvement=0.001, low=-0.01, high=0.012, p=0.6)], 0.05, 30_000,
                           0.005)
    assert open_question.verdict == KEEP_RUNNING

    best = decide("A", 50_000, [challenger("B", improvement=0.01), challenger("C", improvement=0.02, low=0.01, high=0.03)],
                  0.05, 30_000, 0.005)
    assert best.verdict == SHIP and best.variant == "C"


BASE = {"experiment_id": "metrics-test", "variants": [{"name": "A"}, {"name": "B"}]}


def test_metrics_and_analysis_config():
    default = parse_config(BASE)
    assert [(m.name, m.role) for m in default.metrics] == [
        ("converted_units", "primary"), ("conversion_rate", "secondary"), ("error_rate", "guardrail"),
        ("latency_p95", "guardrail")]
    gaussian = parse_config({**BASE, "reward_model": "gaussian"})
    assert [(m.name, m.role) for m in gaussian.metrics[:2]] == [
        ("reward_per_invocation", "primary"), ("converted_units", "secondary")]
    custom = parse_config({**BASE, "metrics": [{"name": "reward_per_invocation", "role": "primary"},
                                               {"name": "latency_p99", "role": "guardrail", "margin": 0.002}],
                           "analysis": {"alpha": 0.01, "mde": 0.05, "correction": "benjamini-hochberg",
                                        "min_sample": 1000}})
    assert custom.metrics[1].margin == 0.002 and custom.analysis.min_sample == 1000
    assert parse_config(custom.to_dict()) == custom  # what is stored reads back the same

    bad = [
        ({"metrics": [{"name": "clicks", "role": "primary"}]}, "metrics[0].name"),
        ({"metrics": [{"name": "error_rate", "role": "guardrail"}]}, "exactly one metric"),
        ({"metrics": [{"name": "conversion_rate", "role": "primary", "margin": 0.1}]}, "guardrails only"),
        ({"metrics": [{"name": "latency_p95", "role": "primary"}]}, "only be a guardrail"),
        ({"metrics": [{"name": "conversion_rate", "role": "primary"},
                      {"name": "error_rate", "role": "guardrail", "margin": 2}]}, "metrics[1].margin"),
        ({"analysis": {"alpha": 1.5}}, "analysis.alpha"),
        ({"analysis": {"correction": "bonferroni"}}, "analysis.correction"),
        ({"analysis": {"min_sample": 0}}, "analysis.min_sample"),
        ({"analysis": {"beta": 0.2}}, "unknown keys"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config({**BASE, **extra})


def test_metrics_of_your_own():
    metrics = [
        {"name": "accuracy", "kind": "ratio", "numerator": "correct", "denominator": "labelled", "role": "primary"},
        {"name": "f1", "kind": "ratio", "numerator": {"tp": 2}, "denominator": {"tp": 2, "fp": 1, "fn": 1},
         "role": "secondary"},
        {"name": "revenue_per_user", "kind": "mean", "numerator": "revenue", "cap": 500, "role": "secondary"},
        {"name": "refunds", "kind": "proportion", "numerator": "refunded", "direction": "lower", "role": "guardrail",
         "margin": 0.02},
    ]
    config = parse_config({**BASE, "metrics": metrics})
    f1 = config.metrics[1].definition
    assert (f1.kind, f1.numerator, f1.denominator) == ("ratio", (("tp", 2.0),), (("tp", 2.0), ("fp", 1.0), ("fn", 1.0)))
    assert config.metrics[2].definition.cap == 500 and not config.metrics[3].higher_is_better
    assert parse_config(config.to_dict()) == config  # what is stored reads back the same

    bad = [
        ({"name": "accuracy", "kind": "median", "numerator": "correct", "role": "primary"}, "metrics[0].kind"),
        ({"name": "accuracy", "kind": "ratio", "numerator": "Correct", "denominator": "n", "role": "primary"},
         "metrics[0].numerator: 'Correct'"),
        ({"name": "accuracy", "kind": "ratio", "numerator": "correct", "role": "primary"}, "metrics[0].denominator"),
        ({"name": "revenue", "kind": "mean", "numerator": "revenue", "denominator": "n", "role": "primary"},
         "ratio metrics only"),
        ({"name": "buyers", "kind": "proportion", "numerator": "revenue", "cap": 5, "role": "primary"},
         "mean and ratio metrics only"),
        ({"name": "revenue", "kind": "mean", "numerator": {"revenue": "1"}, "role": "primary"},
         "metrics[0].numerator.revenue must be a number"),
        ({"name": "error_rate", "kind": "mean", "numerator": "errors", "role": "primary"}, "not a built-in"),
        ({"name": "revenue", "kind": "mean", "numerator": "revenue", "direction": "up", "role": "primary"},
         "metrics[0].direction"),
    ]
    for metric, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            parse_config({**BASE, "metrics": [metric]})
    unguarded = [{"name": "conversion_rate", "role": "primary"},
                 {"name": "latency_budget", "kind": "mean", "numerator": "slow", "role": "guardrail"}]
    with pytest.raises(ConfigError, match=r"metrics\[1\]\.margin is required"):
        parse_config({**BASE, "metrics": unguarded})


def test_a_metric_with_its_own_attribution_window():
    metrics = [{"name": "converted_units", "role": "primary", "attribution_window_seconds": 3600},
               {"name": "revenue_first_day", "kind": "mean", "numerator": "revenue", "role": "secondary",
                "attribution_window_seconds": 86400.0},
               {"name": "error_rate", "role": "guardrail"}]
    config = parse_config({**BASE, "metrics": metrics})
    assert [m.attribution_window_seconds for m in config.metrics] == [3600, 86400, None]
    assert config.metric_windows == (3600, 86400)
    assert parse_config(config.to_dict()) == config

    def refused(extra: dict, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, **extra})

    refused({"metrics": [{"name": "converted_units", "role": "primary", "attribution_window_seconds": 90000}]},
            r"metrics\[0\]\.attribution_window_seconds \(90000\) must not exceed the experiment's "
            r"attribution_window_seconds \(86400\)")
    refused({"attribution_window_seconds": 600,
             "metrics": [{"name": "converted_units", "role": "primary", "attribution_window_seconds": 601}]},
            r"must not exceed the experiment's attribution_window_seconds \(600\)")
    for window in (0, 1.5, "3600", True, -5):
        refused({"metrics": [{"name": "converted_units", "role": "primary", "attribution_window_seconds": window}]},
                r"metrics\[0\]\.attribution_window_seconds must be a whole number of seconds")
    refused({"metrics": [{"name": "converted_units", "role": "primary"},
                         {"name": "latency_p95", "role": "guardrail", "attribution_window_seconds": 60}]},
            r"metrics\[1\]\.attribution_window_seconds: latency_p95 is measured per request")
