"""Metrics an experiment defines (accuracy, F1, revenue per user) through the real pipeline: events
with named values -> Kafka -> `abflow worker` -> unit_state -> the report, against a recount."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportions_ztest

from abflow.core.config import parse_config
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from producers.publisher import Publisher, ensure_topics
from storage.registry import create_experiment
from tests.conftest import wait_until
from tests.helpers import conversion, counted_events, invocation, now, publish

METRICS = [
    {"name": "accuracy", "kind": "ratio", "numerator": "correct", "denominator": "labelled", "role": "primary"},
    {"name": "f1", "kind": "ratio", "numerator": {"tp": 2}, "denominator": {"tp": 2, "fp": 1, "fn": 1},
     "role": "secondary"},
    {"name": "revenue_per_user", "kind": "mean", "numerator": "revenue", "cap": 40, "role": "secondary"},
    {"name": "error_rate", "role": "guardrail"},
    # Metrics with their own, shorter attribution windows: only events within 25 s (15 s) of exposure.
    {"name": "early_accuracy", "kind": "ratio", "numerator": "correct", "denominator": "labelled",
     "role": "secondary", "attribution_window_seconds": 25},
    {"name": "converted_units", "role": "secondary", "attribution_window_seconds": 15},
]
EARLY, QUICK = 25, 15


def test_accuracy_f1_and_revenue_per_user_equal_a_recount(settings, engine, workers):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    config = parse_config({"experiment_id": f"metrics-{np.random.default_rng().integers(1 << 30):x}",
                           "strategy": "WeightedSampling", "metrics": METRICS,
                           "variants": [{"name": "A", "role": "champion"}, {"name": "B", "role": "challenger"}]})
    create_experiment(engine, config)
    exp = config.experiment_id
    rng = np.random.default_rng(21)
    t0 = now() - 900
    per_unit: dict[str, dict[str, dict[str, float]]] = {"A": {}, "B": {}}  # variant -> unit -> value sums
    events = []
    for u in range(600):
        user, variant = f"user-{u}", "AB"[u % 2]
        skill = rng.beta(8, 2) if variant == "A" else rng.beta(9, 2)  # each user's own accuracy
        sums = per_unit[variant].setdefault(user, {"correct": 0.0, "labelled": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0,
                                                   "revenue": 0.0, "early_correct": 0.0, "early_labelled": 0.0,
                                                   "quick_conversion": 0.0})
        t = t0 + rng.uniform(0, 300)
        for visit in range(1 + rng.poisson(3)):
            values = {}
            if rng.random() < 0.7:  # a label came back for this prediction
                correct = float(rng.random() < skill)
                positive = rng.random() < 0.4
                values = {"correct": correct, "labelled": 1.0, "tp": float(positive and correct),
                          "fp": float(not positive and not correct), "fn": float(positive and not correct)}
            event = invocation(exp, variant, t + visit * 10, user)
            if values:
                event["values"] = values
                for key, value in values.items():
                    sums[key] += value
                if visit * 10 <= EARLY:
                    sums["early_correct"] += values["correct"]
                    sums["early_labelled"] += 1.0
            events.append(("invocation", event))
        if rng.random() < 0.3:
            revenue = float(np.round(rng.lognormal(2.5, 1.0), 2))
            delay = float(rng.choice([5.0, 30.0]))
            sums["quick_conversion"] = float(delay <= QUICK)
            event = conversion(exp, variant, t + delay, user)
            event["values"] = {"revenue": revenue}
            sums["revenue"] += revenue
            events.append(("conversion", event))
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        for kind, event in events:
            publish(publisher, kind, event)
        publisher.flush(30)
    worker = workers()
    wait_until(lambda: counted_events(engine, [exp]) == len(events), 90, message="every event counted",
               workers=[worker])

    report = build_report(load_report_input(engine, exp))
    rows = {(c["metric"], c["variant"]): c for c in report["comparisons"]}

    def ratio(variant, y, x):
        ys = np.array([sum(c * s[k] for k, c in y.items()) for s in per_unit[variant].values()])
        xs = np.array([sum(c * s[k] for k, c in x.items()) for s in per_unit[variant].values()])
        r = ys.sum() / xs.sum()
        return r, np.var(ys - r * xs, ddof=1) / xs.mean() ** 2 / len(xs)

    # Every per-variant figure equals the recount; a ratio's interval is the delta method's on raw units.
    for name, y, x in (("accuracy", {"correct": 1}, {"labelled": 1}), ("f1", {"tp": 2}, {"tp": 2, "fp": 1, "fn": 1}),
                       ("early_accuracy", {"early_correct": 1}, {"early_labelled": 1})):
        (ra, va), (rb, vb) = ratio("A", y, x), ratio("B", y, x)
        row = rows[(name, "B")]
        assert row["champion_mean"] == pytest.approx(ra, rel=1e-12) and row["challenger_mean"] == pytest.approx(rb, rel=1e-12)
        half = stats.norm.ppf(0.975) * math.sqrt(va + vb)
        assert (row["low"], row["high"]) == (pytest.approx(rb - ra - half, rel=1e-9), pytest.approx(rb - ra + half, rel=1e-9))
        assert row["test"].startswith("delta method")
    capped = {v: np.minimum([s["revenue"] for s in per_unit[v].values()], 40.0) for v in "AB"}
    row = rows[("revenue_per_user", "B")]
    assert row["champion_mean"] == pytest.approx(capped["A"].mean(), rel=1e-12)
    assert row["challenger_mean"] == pytest.approx(capped["B"].mean(), rel=1e-12)
    welch = stats.ttest_ind(capped["B"], capped["A"], equal_var=False)
    assert row["p_value"] == pytest.approx(welch.pvalue, rel=1e-9) and row["test"].startswith("Welch")
    # The share of units that converted within 15 s of exposure: the test on those units alone.
    quick = {v: np.array([s["quick_conversion"] for s in per_unit[v].values()]) for v in "AB"}
    row = rows[("converted_units", "B")]
    assert (row["champion_mean"], row["challenger_mean"]) == (pytest.approx(quick["A"].mean(), rel=1e-12),
                                                              pytest.approx(quick["B"].mean(), rel=1e-12))
    assert 0 < quick["A"].sum() < sum(s["revenue"] > 0 for s in per_unit["A"].values())  # some converted later
    z = proportions_ztest([quick["B"].sum(), quick["A"].sum()], [len(quick["B"]), len(quick["A"])])
    assert row["p_value"] == pytest.approx(z[1], rel=1e-9)
    units = {v["variant"]: v["units"] for v in report["variants"]}
    assert units == {"A": 300, "B": 300}
