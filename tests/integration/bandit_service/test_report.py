"""The experiment report against a real PostgreSQL: aggregates with a known effect, drift under
moving weights, harm, sample-ratio mismatch, an empty experiment; the CLI and the API serve it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import text
from statsmodels.stats import proportion as sm_proportion

from abflow.core.config import parse_config
from abflow.core.errors import ExperimentNotFound
from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from bandit_service.report.render import render_html, render_text
from bandit_service.stats.power import sample_size_msprt, sample_size_proportions
from storage.registry import create_experiment
from tests.conftest import ADMIN

START = datetime(2026, 1, 5, tzinfo=timezone.utc)
WINDOW = 60


def new_experiment(engine, strategy="WeightedSampling", **extra) -> str:
    experiment_id = f"report-{uuid.uuid4().hex[:8]}"
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "strategy": strategy,
        "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.5},
                     {"name": "Challenger", "role": "challenger", "initial_weight": 0.5}],
        **extra,
    }))
    return experiment_id


def latency_hist(rng, n: int, median_ms: float) -> list[int]:
    hist = [0] * LATENCY_BUCKETS
    for value in median_ms * np.exp(rng.normal(0, 0.5, n)):
        hist[latency_bucket(float(value))] += 1
    return hist


def insert_window(engine, experiment_id, variant, minute, invocations, conversions, errors=0, hist=None) -> None:
    hist = hist or [0] * LATENCY_BUCKETS
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO variant_windows (experiment_id, variant, window_start, window_seconds, invocations,"
            " conversions, reward_sum, reward_sq_sum, errors, latency_count, latency_ms_sum, latency_hist)"
            " VALUES (:e, :v, :start, :w, :n, :c, :c, :c, :errors, :lc, 0, :hist)"
        ), {"e": experiment_id, "v": variant, "start": START + timedelta(minutes=minute), "w": WINDOW,
            "n": invocations, "c": conversions, "errors": errors, "lc": sum(hist), "hist": hist})


def insert_units(engine, experiment_id, variant, minute, converted: int, errors: int, n: int, rng) -> None:
    """``n`` units exposed in the window at ``minute``, one invocation each: ``converted`` of them converted and
    ``errors`` had an error (what the stream would have written for such traffic)."""
    exposed = (START + timedelta(minutes=minute)).timestamp()
    conversions = np.r_[np.ones(converted), np.zeros(n - converted)]
    failed = rng.permutation(np.r_[np.ones(errors), np.zeros(n - errors)])
    raw = engine.raw_connection()
    try:
        with raw.driver_connection.cursor() as cur, cur.copy(
                "COPY unit_state (experiment_id, unit_id, variant, exposed_at, propensity, multiple, "
                "invocations, conversions, reward, errors) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((experiment_id, f"{variant}-{minute}-{i}", variant, exposed, 0.5, False,
                                1.0, conversions[i], conversions[i], failed[i]))
        raw.driver_connection.commit()
    finally:
        raw.close()


def insert_allocation(engine, experiment_id, version, minute, weights) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO allocations (experiment_id, version, strategy, phase, weights, statistics, computed_at)"
            " VALUES (:e, :version, 'ThompsonSampling', 'ThompsonSampling', CAST(:weights AS jsonb), '{}', :at)"
        ), {"e": experiment_id, "version": version, "weights": json.dumps(weights),
            "at": START + timedelta(minutes=minute)})


def fixed_split(engine, experiment_id, rates, error_rates=(0.01, 0.01), latency=(40.0, 40.0), users=(40_000, 40_000),
                minutes=10, seed=1) -> dict:
    """Binomial traffic in ``minutes`` windows; returns the totals per variant."""
    rng = np.random.default_rng(seed)
    totals = {}
    for name, rate, error_rate, median, n in zip(("Champion", "Challenger"), rates, error_rates, latency, users):
        per_minute = n // minutes
        for minute in range(minutes):
            conversions = int(rng.binomial(per_minute, rate))
            errors = int(rng.binomial(per_minute, error_rate))
            insert_window(engine, experiment_id, name, minute, per_minute, conversions, errors,
                          latency_hist(rng, per_minute, median))
            insert_units(engine, experiment_id, name, minute, conversions, errors, per_minute, rng)
            totals.setdefault(name, [0, 0])
            totals[name][0] += per_minute
            totals[name][1] += conversions
    return totals


def report_of(engine, experiment_id) -> dict:
    return build_report(load_report_input(engine, experiment_id))


def primary(report) -> dict:
    return next(c for c in report["comparisons"] if c["role"] == "primary")


def test_known_effect_ships_the_challenger(engine):
    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    totals = fixed_split(engine, experiment_id, rates=(0.05, 0.065))
    report = report_of(engine, experiment_id)

    assert report["decision"]["verdict"] == "ship", report["decision"]
    assert report["decision"]["variant"] == "Challenger"
    comparison = primary(report)
    (n_a, c_a), (n_b, c_b) = totals["Champion"], totals["Challenger"]
    assert comparison["difference"] == pytest.approx(c_b / n_b - c_a / n_a, abs=1e-12)
    # One allocation period: the pooled two-proportion z-test on (units converted, units exposed).
    _, p_pooled = sm_proportion.proportions_ztest([c_b, c_a], [n_b, n_a])
    assert comparison["p_value"] == pytest.approx(p_pooled, rel=1e-9)
    assert comparison["low"] < 0.015 < comparison["high"]
    assert comparison["always_valid_low"] < comparison["low"] and comparison["always_valid_high"] > comparison["high"]
    assert all(g["status"] == "pass" for g in report["guardrails"]), report["guardrails"]
    assert report["sample_ratio"]["checked"] and not report["sample_ratio"]["mismatch"]
    bayes = {b["variant"]: b for b in report["bayesian"]["variants"]}
    assert bayes["Challenger"]["p_beats_champion"] > 0.999
    # The minimum sample is the always-valid test's (the one the decision ships on), with its τ:
    # about twice the fixed-horizon z-test's.
    tau = comparison["tau"]
    assert report["experiment"]["analysis"]["min_sample"] == msprt_min_sample(c_a / n_a, 0.2, tau)
    assert 1.8 < msprt_min_sample(c_a / n_a, 0.2, tau) / sample_size_proportions(c_a / n_a, c_a / n_a * 1.2)[0] < 2.2


def msprt_min_sample(rate: float, mde: float, tau: float) -> int:
    target = rate * (1 + mde)
    return sample_size_msprt(target - rate, rate * (1 - rate), target * (1 - target), tau)[0]


def test_no_effect_with_enough_data_is_not_shipped(engine):
    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    fixed_split(engine, experiment_id, rates=(0.05, 0.05), users=(200_000, 200_000), seed=3)
    report = report_of(engine, experiment_id)
    assert report["decision"]["verdict"] == "do not ship", report["decision"]
    assert "cannot beat" in report["decision"]["reasons"][0]


def test_too_little_data_keeps_running(engine):
    experiment_id = new_experiment(engine)
    fixed_split(engine, experiment_id, rates=(0.05, 0.055), users=(2_000, 2_000), seed=4)
    report = report_of(engine, experiment_id)
    assert report["decision"]["verdict"] == "keep running", report["decision"]


def test_error_spike_stops_for_harm(engine):
    experiment_id = new_experiment(engine)
    fixed_split(engine, experiment_id, rates=(0.05, 0.05), error_rates=(0.01, 0.06), users=(5_000, 5_000))
    report = report_of(engine, experiment_id)
    assert report["decision"]["verdict"] == "stop for harm", report["decision"]
    assert report["decision"]["variant"] == "Challenger"
    assert "error_rate" in report["decision"]["reasons"][0]
    status = {g["metric"]: g["status"] for g in report["guardrails"]}
    assert status["error_rate"] == "harm" and status["latency_p95"] == "pass"


def test_slow_challenger_fails_the_latency_guardrail(engine):
    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    fixed_split(engine, experiment_id, rates=(0.05, 0.065), latency=(40.0, 80.0))
    report = report_of(engine, experiment_id)
    status = {g["metric"]: g["status"] for g in report["guardrails"]}
    assert status["latency_p95"] == "harm"
    assert report["decision"]["verdict"] == "stop for harm"


def test_sample_ratio_mismatch_blocks_shipping(engine):
    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    fixed_split(engine, experiment_id, rates=(0.05, 0.065), users=(40_000, 44_000))
    report = report_of(engine, experiment_id)
    assert report["sample_ratio"]["mismatch"] and report["sample_ratio"]["p_value"] < 0.001
    assert report["decision"]["verdict"] == "do not ship"
    assert "sample-ratio" in report["decision"]["reasons"][0]


def test_drift_under_moving_weights_is_stratified_away(engine):
    """An A/A test whose bandit moved traffic to the challenger while the rate rose: pooling shows a
    large false lift; the report, stratified by allocation period, does not."""
    experiment_id = new_experiment(engine, strategy="ThompsonSampling")
    rng = np.random.default_rng(7)
    schedule = [(0.5, 0.04), (0.8, 0.06), (0.95, 0.09)]  # challenger share, true rate of both
    pooled = {"Champion": [0, 0], "Challenger": [0, 0]}
    for period, (share, rate) in enumerate(schedule):
        if period:
            insert_allocation(engine, experiment_id, period, period * 100, {"Champion": 1 - share, "Challenger": share})
        for minute in range(period * 100, period * 100 + 100):
            for name, weight in (("Champion", 1 - share), ("Challenger", share)):
                n = int(1_000 * weight)
                c = int(rng.binomial(n, rate))
                insert_window(engine, experiment_id, name, minute, n, c)
                insert_units(engine, experiment_id, name, minute, c, 0, n, rng)
                pooled[name][0] += n
                pooled[name][1] += c
    report = report_of(engine, experiment_id)
    naive = pooled["Challenger"][1] / pooled["Challenger"][0] - pooled["Champion"][1] / pooled["Champion"][0]
    assert naive > 0.015  # the Simpson's-paradox lift
    comparison = primary(report)
    assert report["experiment"]["allocation_periods"] == 3 and comparison["periods"] == 3
    assert abs(comparison["difference"]) < 0.004
    assert comparison["low"] < 0 < comparison["high"]
    assert report["decision"]["verdict"] != "ship"
    # Exposures are checked against the weights in effect when each unit was exposed: no mismatch.
    assert report["sample_ratio"]["checked"] and not report["sample_ratio"]["mismatch"]


def test_empty_experiment_reports_keep_running(engine):
    experiment_id = new_experiment(engine)
    report = report_of(engine, experiment_id)
    assert report["decision"]["verdict"] == "keep running"
    assert all(v["invocations"] == 0 for v in report["variants"])
    assert "VARIANTS" in render_text(report)
    assert "<html" in render_html(report)


def test_unknown_experiment_is_a_clear_error(engine):
    with pytest.raises(ExperimentNotFound):
        load_report_input(engine, "no-such-experiment")


def test_cli_prints_writes_json_and_offline_html(engine, run_env, tmp_path):
    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    fixed_split(engine, experiment_id, rates=(0.05, 0.065))
    json_path, html_path = tmp_path / "report.json", tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "abflow.cli", "report", experiment_id, "--json", str(json_path),
                             "--html", str(html_path)],
                            env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "DECISION  SHIP: Challenger" in result.stdout
    assert json.loads(json_path.read_text())["decision"]["verdict"] == "ship"
    page = html_path.read_text()
    assert page.count("<svg") == 3  # rates, cumulative reward, posteriors (no weight history: a fixed split)
    assert "<script" not in page and "src=" not in page and "<link" not in page

    missing = subprocess.run([sys.executable, "-m", "abflow.cli", "report", "no-such-experiment"], env=run_env,
                             capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "no-such-experiment" in missing.stderr


def test_api_serves_the_same_report(engine, settings):
    from fastapi.testclient import TestClient

    from bandit_service.api import create_app

    experiment_id = new_experiment(engine, analysis={"mde": 0.2})
    fixed_split(engine, experiment_id, rates=(0.05, 0.065))
    with TestClient(create_app(settings), headers=ADMIN) as client:
        served = client.get(f"/experiments/{experiment_id}/report")
        assert served.status_code == 200
        assert served.json() == report_of(engine, experiment_id)
        assert client.get("/experiments/no-such-experiment/report").status_code == 404
