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


def fixed_split(rates, users=(40_000, 40_000), error_rates=(0.01, 0.01), latency=(40.0, 40.0), seed=1, **extra
                ) -> ReportInput:
    """A fixed 50/50 experiment (one allocation period) with binomial outcomes."""
    rng = np.random.default_rng(seed)
    period = {name: sums(n, int(rng.binomial(n, rate)), int(rng.binomial(n, error_rate)))
              for name, rate, n, error_rate in zip(NAMES, rates, users, error_rates)}
    histograms = {name: latency_hist(rng, 5_000, median) for name, median in zip(NAMES, latency)}
    return ReportInput(config=config(**extra), status="running", periods={0: period}, allocations=[],
                       histograms=histograms)


def primary(report: dict) -> dict:
    return next(c for c in report["comparisons"] if c["role"] == "primary")


def test_known_effect_ships_with_statsmodels_p_value():
    data = fixed_split(rates=(0.05, 0.065), analysis={"mde": 0.2})
    report = build_report(data)
    assert report["decision"]["verdict"] == "ship" and report["decision"]["variant"] == "Challenger"
    a, b = data.periods[0]["Champion"], data.periods[0]["Challenger"]
    comparison = primary(report)
    assert comparison["difference"] == pytest.approx(
        b["conversions"] / b["invocations"] - a["conversions"] / a["invocations"], abs=1e-12)
    _, p_value = sm_proportion.proportions_ztest([b["conversions"], a["conversions"]],
                                                 [b["invocations"], a["invocations"]])
    assert comparison["p_value"] == pytest.approx(p_value, rel=0.01)
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
    periods, allocations, pooled = {}, [], {name: [0, 0] for name in NAMES}
    for period, (share, rate) in enumerate(schedule):
        weights = {"Champion": 1 - share, "Challenger": share}
        if period:
            allocations.append((period, START + timedelta(minutes=100 * period), weights))
        periods[period] = {}
        for name in NAMES:
            n = int(100_000 * weights[name])
            c = int(rng.binomial(n, rate))
            periods[period][name] = sums(n, c)
            pooled[name][0] += n
            pooled[name][1] += c
    report = build_report(ReportInput(config=config("ThompsonSampling"), status="running", periods=periods,
                                      allocations=allocations))
    naive = pooled["Challenger"][1] / pooled["Challenger"][0] - pooled["Champion"][1] / pooled["Champion"][0]
    assert naive > 0.015
    comparison = primary(report)
    assert comparison["periods"] == 3 and abs(comparison["difference"]) < 0.004
    assert comparison["low"] < 0 < comparison["high"]
    assert report["decision"]["verdict"] != "ship"


def test_empty_input_keeps_running_and_renders():
    report = build_report(ReportInput(config=config(), status="running", periods={}, allocations=[]))
    assert report["decision"]["verdict"] == "keep running"
    assert all(v["invocations"] == 0 for v in report["variants"])
    assert "VARIANTS" in render_text(report) and "<html" in render_html(report)
