"""The report built from a ``ReportInput`` in memory: the pure half of the report, no database.

The integration tests (tests/integration/bandit_service/test_report.py) run the same cases
through PostgreSQL; these pin the analysis itself, fast.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from statsmodels.stats import proportion as sm_proportion

from abflow.core.config import parse_config
from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from bandit_service.report.build import ReportInput, build_report
from bandit_service.report.evidence import UnitMoments
from bandit_service.report.render import render_html, render_text

START = datetime(2026, 1, 5, tzinfo=timezone.utc)
NAMES = ("Champion", "Challenger")


def config(strategy="WeightedSampling", **extra):
    return parse_config({
        "experiment_id": "in-memory", "strategy": strategy,
        "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.5},
                     {"name": "Challenger", "role": "challenger", "initial_weight": 0.5}],
        **extra})


def sums(n: int, conversions: int, errors: int = 0) -> dict:
    """One variant's sums in one allocation period (binary rewards: reward = conversion)."""
    return {"invocations": n, "conversions": conversions, "reward_sum": float(conversions),
            "reward_sq_sum": float(conversions), "errors": errors}


def latency_hist(rng, n: int, median_ms: float) -> list[int]:
    hist = [0] * LATENCY_BUCKETS
    for value in median_ms * np.exp(rng.normal(0, 0.5, n)):
        hist[latency_bucket(float(value))] += 1
    return hist


def one_visit_units(rng, n: int, rate: float, error_rate: float = 0.01, metrics=()) -> tuple[UnitMoments, dict]:
    """``n`` exposed units of one invocation each: their moments (for ``metrics``), and the invocations' sums."""
    converted = rng.random(n) < rate
    errors = rng.random(n) < error_rate
    moments = UnitMoments.of_units({"invocations": np.ones(n), "conversions": converted, "reward": converted,
                                    "errors": errors}, metrics)
    return moments, sums(n, int(converted.sum()), int(errors.sum()))


def fixed_split(rates, users=(40_000, 40_000), error_rates=(0.01, 0.01), latency=(40.0, 40.0), seed=1, **extra
                ) -> ReportInput:
    """A fixed 50/50 experiment (one allocation period): units of one visit, binomial outcomes."""
    rng = np.random.default_rng(seed)
    units, period = {}, {}
    experiment = config(**extra)
    for name, rate, n, error_rate in zip(NAMES, rates, users, error_rates):
        units[name], period[name] = one_visit_units(rng, n, rate, error_rate, experiment.metrics)
    histograms = {name: latency_hist(rng, 5_000, median) for name, median in zip(NAMES, latency)}
    return ReportInput(config=experiment, status="running", periods={0: period}, allocations=[],
                       histograms=histograms, units={0: units}, exposures={(0, name): m.n for name, m in units.items()})


def primary(report: dict) -> dict:
    return next(c for c in report["comparisons"] if c["role"] == "primary")


def test_known_effect_ships_with_statsmodels_p_value():
    data = fixed_split(rates=(0.05, 0.065), analysis={"mde": 0.2})
    report = build_report(data)
    assert report["decision"]["verdict"] == "ship" and report["decision"]["variant"] == "Challenger"
    a, b = data.units[0]["Champion"], data.units[0]["Challenger"]
    comparison = primary(report)
    assert comparison["metric"] == "converted_units" and comparison["test"].startswith("two-proportion z-test")
    assert comparison["difference"] == pytest.approx(b.sums["converted"] / b.n - a.sums["converted"] / a.n, abs=1e-12)
    _, p_value = sm_proportion.proportions_ztest([b.sums["converted"], a.sums["converted"]], [b.n, a.n])
    assert comparison["p_value"] == pytest.approx(p_value, rel=1e-9)
    assert all(g["status"] == "pass" for g in report["guardrails"]), report["guardrails"]


def test_no_effect_with_enough_data_is_not_shipped():
    report = build_report(fixed_split(rates=(0.05, 0.05), users=(200_000, 200_000), seed=3, analysis={"mde": 0.2}))
    assert report["decision"]["verdict"] == "do not ship", report["decision"]


def test_error_spike_stops_for_harm():
    report = build_report(fixed_split(rates=(0.05, 0.05), users=(5_000, 5_000), error_rates=(0.01, 0.06)))
    assert report["decision"]["verdict"] == "stop for harm" and report["decision"]["variant"] == "Challenger"
    status = {g["metric"]: g["status"] for g in report["guardrails"]}
    assert status["error_rate"] == "harm" and status["latency_p95"] == "pass"


def test_slow_challenger_fails_the_latency_guardrail():
    report = build_report(fixed_split(rates=(0.05, 0.065), latency=(40.0, 80.0), analysis={"mde": 0.2}))
    assert {g["metric"]: g["status"] for g in report["guardrails"]}["latency_p95"] == "harm"
    assert report["decision"]["verdict"] == "stop for harm"


def test_sample_ratio_mismatch_blocks_shipping():
    report = build_report(fixed_split(rates=(0.05, 0.065), users=(40_000, 44_000), analysis={"mde": 0.2}))
    assert report["sample_ratio"]["mismatch"] and report["sample_ratio"]["p_value"] < 0.001
    assert report["decision"]["verdict"] == "do not ship"


def test_drift_under_moving_weights_is_stratified_away():
    """A/A while a bandit moved traffic to the challenger and the rate rose: pooled counts show a lift,
    the estimate stratified by allocation period does not."""
    rng = np.random.default_rng(7)
    schedule = [(0.5, 0.04), (0.8, 0.06), (0.95, 0.09)]  # challenger share, true rate of both
    periods, allocations, units, pooled = {}, [], {}, {name: [0, 0] for name in NAMES}
    for period, (share, rate) in enumerate(schedule):
        weights = {"Champion": 1 - share, "Challenger": share}
        exposed_at = START + timedelta(minutes=100 * period)
        if period:
            allocations.append((period, exposed_at, weights))
        periods[period] = {}
        for name in NAMES:
            n = int(100_000 * weights[name])
            units.setdefault(period, {})[name], periods[period][name] = one_visit_units(
                rng, n, rate, metrics=config("ThompsonSampling").metrics)
            pooled[name][0] += n
            pooled[name][1] += periods[period][name]["conversions"]
    report = build_report(ReportInput(config=config("ThompsonSampling"), status="running", periods=periods,
                                      allocations=allocations, units=units,
                                      exposures={(k, name): m.n for k, p in units.items() for name, m in p.items()}))
    naive = pooled["Challenger"][1] / pooled["Challenger"][0] - pooled["Champion"][1] / pooled["Champion"][0]
    assert naive > 0.015
    comparison = primary(report)
    assert comparison["periods"] == 3 and abs(comparison["difference"]) < 0.004
    assert comparison["low"] < 0 < comparison["high"]
    assert report["decision"]["verdict"] != "ship"


@pytest.mark.parametrize("periods", [1, 3])
def test_converted_shares_do_not_depend_on_the_metrics_chosen(periods):
    """A canary whose metrics leave converted_units out showed a period-weighted converted share of
    0.00 % for both variants (and a Bayesian view of zero conversions) beside raw shares of 94-96 %."""
    experiment = config(metrics=[{"name": "reward_per_unit", "role": "primary"},
                                 {"name": "error_rate", "role": "guardrail"}])
    rng = np.random.default_rng(5)
    units, allocations = {}, []
    for period in range(periods):
        if period:
            allocations.append((period, START + timedelta(minutes=10 * period), {"Champion": 0.5, "Challenger": 0.5}))
        units[period] = {name: one_visit_units(rng, 4_000, rate, metrics=experiment.metrics)[0]
                         for name, rate in zip(NAMES, (0.945, 0.957))}
    report = build_report(ReportInput(config=experiment, status="running", periods={}, allocations=allocations,
                                      units=units))
    for row in report["variants"]:
        raw = row["converted_units"] / row["units"]
        assert 0.93 < raw < 0.97 and row["converted_share_adjusted"] == pytest.approx(raw, abs=0.002), row
    posterior = {row["variant"]: row for row in report["bayesian"]["variants"]}
    assert posterior["Challenger"]["mean"] == pytest.approx(0.957, abs=0.01)


def test_empty_input_keeps_running_and_renders():
    report = build_report(ReportInput(config=config(), status="running", periods={}, allocations=[]))
    assert report["decision"]["verdict"] == "keep running"
    assert all(v["invocations"] == 0 for v in report["variants"])
    assert "VARIANTS" in render_text(report) and "<html" in render_html(report)


def test_seed_003_numbers_give_its_p_value():
    """Seed 003: A 520 of 5,000 users converted, B 580 of 5,000 (one invocation each): p = 0.055161."""
    def units(converted: int) -> UnitMoments:
        flags = np.r_[np.ones(converted), np.zeros(5_000 - converted)]
        return UnitMoments.of_units({"invocations": np.ones(5_000), "conversions": flags, "reward": flags,
                                     "errors": np.zeros(5_000)}, config().metrics)

    data = ReportInput(config=config(), status="running", periods={}, allocations=[],
                       units={0: {"Champion": units(520), "Challenger": units(580)}})
    comparison = primary(build_report(data))
    assert round(comparison["p_value"], 6) == 0.055161
    assert comparison["test"] == "two-proportion z-test (pooled) on exposed units"


def test_a_ratio_metric_on_returning_users_is_the_delta_method_on_the_raw_units():
    """Conversions per invocation of users who come back: the report's interval is the delta method's on
    the raw per-unit numbers, computed here independently; and wider than invocations-as-trials."""
    rng = np.random.default_rng(11)
    experiment = config(metrics=[{"name": "conversion_rate", "role": "primary"}])
    raw, units = {}, {}
    for name, rate in zip(NAMES, (0.05, 0.06)):
        visits = 1 + rng.poisson(4, 20_000)
        propensity = rng.beta(1, 19, 20_000) * rate / 0.05
        conversions = rng.binomial(visits, np.clip(propensity, 0, 1))
        raw[name] = (visits.astype(float), conversions.astype(float))
        units[name] = UnitMoments.of_units({"invocations": visits, "conversions": conversions,
                                                     "reward": conversions, "errors": np.zeros(20_000)},
                                                    experiment.metrics)
    report = build_report(ReportInput(config=experiment, status="running", periods={}, allocations=[], units={0: units}))
    comparison = primary(report)

    def delta(x, y):  # Var(Σy/Σx) by linearising around the ratio, per unit
        ratio = y.sum() / x.sum()
        return ratio, np.var(y - ratio * x, ddof=1) / x.mean() ** 2 / len(x)

    (ra, va), (rb, vb) = delta(*raw["Champion"]), delta(*raw["Challenger"])
    half = 1.959963984540054 * np.sqrt(va + vb)
    assert comparison["difference"] == pytest.approx(rb - ra, rel=1e-9)
    assert comparison["low"] == pytest.approx(rb - ra - half, rel=1e-9)
    assert comparison["high"] == pytest.approx(rb - ra + half, rel=1e-9)
    trials = sum(np.sqrt(r * (1 - r) / raw[n][0].sum()) ** 2 for r, n in ((ra, "Champion"), (rb, "Challenger")))
    # The clustered users' extra variance: a design effect of 1 + (visits − 1)·ICC ≈ 1 + 4 × 0.048 ≈ 1.19.
    assert half > np.sqrt(1.1) * 1.959963984540054 * np.sqrt(trials)
