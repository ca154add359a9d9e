"""Shadow releases: the SDK tees requests to a shadow model, the stream aggregates the pairs, the report shows them."""

from __future__ import annotations

import time
import uuid

import numpy as np
import orjson
import psycopg
import pytest
from sqlalchemy import text
from statsmodels.stats.contingency_tables import mcnemar

from abflow.core.config import ConfigError, parse_config
from bandit_service.allocations import publish_allocation
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from bandit_service.report.render import render_text
from producers.contracts import SHADOW, InvalidEvent, Invocation, Shadow, parse_event
from producers.publisher import Publisher, ensure_topics
from producers.sdk import ServingClient, loggable
from producers.simulator import Scenario, VariantProfile, generate, parse_shadow, virtual_clock
from storage.registry import create_experiment
from stream_jobs.windows import aggregate_shadows
from tests.conftest import wait_until
from tests.helpers import stream_counters

USERS = 600


def shadow_event(**fields) -> dict:
    event = {"event_id": str(uuid.uuid4()), "experiment_id": "e", "variant": "v3", "served_variant": "A",
             "user_id": "u", "timestamp": time.time()}
    event.update(fields)
    return event


def test_shadow_contract_and_window_sums():
    event = parse_event(SHADOW, orjson.dumps(shadow_event(latency_ms=12.0, served_latency_ms=8.0, agree=True,
                                                          prediction=[0.1, 0.9], served_prediction=[0.2, 0.8])))
    assert (event.variant, event.served_variant, event.agree, event.prediction) == ("v3", "A", True, [0.1, 0.9])
    with pytest.raises(InvalidEvent, match="'agree' must be absent"):
        parse_event(SHADOW, orjson.dumps(shadow_event(error=True, agree=False)))
    with pytest.raises(InvalidEvent, match="served_variant"):
        parse_event(SHADOW, orjson.dumps({k: v for k, v in shadow_event().items() if k != "served_variant"}))
    with pytest.raises(InvalidEvent, match="served_latency_ms"):
        parse_event(SHADOW, orjson.dumps(shadow_event(served_latency_ms=-1)))

    events = [parse_event(SHADOW, orjson.dumps(shadow_event(timestamp=120.0 + i, latency_ms=float(i), agree=i % 3 != 0,
                                                           served_latency_ms=1.0))) for i in range(6)]
    events.append(parse_event(SHADOW, orjson.dumps(shadow_event(timestamp=121.0, error=True))))
    events.append(parse_event(SHADOW, orjson.dumps(shadow_event(timestamp=122.0, error=True, served_error=True))))
    (key, totals), = aggregate_shadows(events, 60).items()
    assert key == ("e", "v3", "A", 120)
    assert (totals.requests, totals.compared, totals.agreements, totals.errors) == (8, 6, 4, 2)
    assert (totals.served_errors, totals.both_errors) == (1, 1)
    assert (totals.latency.count, totals.latency.ms_sum, totals.served_latency.count) == (6, 15.0, 6)
    assert sum(totals.latency.hist) == 6


def test_shadow_config():
    base = {"experiment_id": "x", "variants": [{"name": "A"}, {"name": "B"}]}
    assert parse_config({**base, "shadows": [{"name": "v3", "model_version": 3}]}).shadows[0].model_version == "3"
    with pytest.raises(ConfigError, match="already a variant"):
        parse_config({**base, "shadows": [{"name": "B"}]})
    with pytest.raises(ConfigError, match="shadows"):
        parse_config({**base, "shadows": {"name": "v3"}})


def test_loggable_predictions():
    import numpy as np

    assert loggable(np.array([0.5, 0.25])) == [0.5, 0.25]
    assert loggable({"label": "cat", 3: 1}) == {"label": "cat", "3": 1}
    assert loggable(object()) == {"unloggable": "object"}
    assert loggable("x" * 10_000) == {"truncated_bytes": 10_002}


def champion_model(i: int) -> int:
    if i % 50 == 1:
        raise RuntimeError("champion failed")
    return i % 7


def shadow_model(i: int) -> int:
    time.sleep(0.001)
    if i % 20 == 0 or i % 100 == 51:  # the second: on requests where the champion fails too
        raise RuntimeError("shadow failed")
    return i % 7 if i % 5 else -1  # disagrees on every fifth request


def test_tee_serves_the_champion_and_the_stream_counts_every_pair_once(settings, engine, services):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = f"shadow-{uuid.uuid4().hex[:8]}"
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "strategy": "WeightedSampling",
        "variants": [{"name": "A", "initial_weight": 0.5}, {"name": "B", "initial_weight": 0.5}],
        "shadows": [{"name": "model-v3", "model_version": "3.0"}]}))
    with psycopg.connect(settings.libpq_url) as conn, Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        publish_allocation(conn, publisher, settings.topics.allocations, experiment_id, "WeightedSampling",
                           "WeightedSampling", {"A": 0.5, "B": 0.5}, {})
    worker = services("worker")

    answers, failures = {}, 0
    with ServingClient(settings.kafka_bootstrap, settings.topics) as client:
        assert client.wait_ready(30)
        wait_until(lambda: client._serving.get(experiment_id), 30, message="the weights in the SDK")
        for i in range(USERS):
            served = client.assign(experiment_id, f"user-{i}")
            try:
                # The shadow runs later on another thread: bind i now.
                answers[i] = client.tee(served, lambda: champion_model(i), {"model-v3": lambda i=i: shadow_model(i)})
            except RuntimeError:
                failures += 1
        # A shadow this experiment does not declare is a dead letter; a repeated event counts once.
        bad = shadow_event(experiment_id=experiment_id, variant="model-v9")
        client.publisher.produce(settings.topics.shadows, orjson.dumps(bad), key="u")
    # The user always got the champion's answer, whatever the shadow did.
    assert answers == {i: i % 7 for i in range(USERS) if i % 50 != 1}
    assert failures == len([i for i in range(USERS) if i % 50 == 1])

    shadow_failed = {i for i in range(USERS) if i % 20 == 0 or i % 100 == 51}
    served_failed = {i for i in range(USERS) if i % 50 == 1}
    compared = [i for i in range(USERS) if i not in shadow_failed | served_failed]
    expected = {"requests": USERS, "compared": len(compared), "agreements": sum(1 for i in compared if i % 5),
                "errors": len(shadow_failed), "served_errors": len(served_failed),
                "both_errors": len(shadow_failed & served_failed),
                "latency_count": USERS, "served_latency_count": USERS}

    def totals() -> dict:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT " + ", ".join(f"coalesce(sum({c}), 0)" for c in expected)
                + " FROM shadow_windows WHERE experiment_id = :e"), {"e": experiment_id}).one()
        return dict(zip(expected, (int(v) for v in row)))

    wait_until(lambda: totals()["requests"] >= USERS
               and stream_counters(engine, [settings.topics.shadows])["dead_letters"] >= 1, 60,
               message="shadow events aggregated", workers=[worker])
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:  # a redelivered event
        first = shadow_event(experiment_id=experiment_id, served_variant="A", variant="model-v3")
        publisher.produce(settings.topics.shadows, orjson.dumps(first), key="u")
        publisher.produce(settings.topics.shadows, orjson.dumps(first), key="u")
    wait_until(lambda: stream_counters(engine, [settings.topics.shadows])["duplicates"] >= 1, 60,
               message="the duplicate seen", workers=[worker])
    expected["requests"] += 1
    assert totals() == expected
    assert stream_counters(engine, [settings.topics.shadows]) == {"counted": USERS + 1, "duplicates": 1,
                                                                  "dead_letters": 1}

    report = build_report(load_report_input(engine, experiment_id))
    rows = report["shadows"]
    assert {r["served_variant"] for r in rows} == {"A", "B"} and {r["variant"] for r in rows} == {"model-v3"}
    assert sum(r["requests"] for r in rows) == USERS + 1
    agreement = sum(r["agreement"] * r["compared"] for r in rows) / sum(r["compared"] for r in rows)
    assert agreement == pytest.approx(expected["agreements"] / expected["compared"])
    for r in rows:
        assert r["agreement_low"] <= r["agreement"] <= r["agreement_high"]
        assert r["shadow"]["latency_p95_ms"] >= 1.0  # the shadow sleeps a millisecond
    # Errors compared as pairs: the 2×2 table adds up, and the test is statsmodels' McNemar on it.
    paired = [r["errors_paired"] for r in rows]
    assert sum(p["both"] for p in paired) == len(shadow_failed & served_failed) > 0
    assert sum(p["shadow_only"] for p in paired) == len(shadow_failed - served_failed)
    assert sum(p["served_only"] for p in paired) == len(served_failed - shadow_failed)
    for r, p in zip(rows, paired):
        assert p["difference"] == pytest.approx(r["shadow"]["error_rate"] - r["served"]["error_rate"])
        assert p["low"] <= p["difference"] <= p["high"]
        assert p["p_value"] == pytest.approx(mcnemar([[0, p["served_only"]], [p["shadow_only"], 0]]).pvalue)
    assert "SHADOWS" in render_text(report) and "model-v3" in render_text(report)
    assert "McNemar p" in render_text(report)


def test_simulated_shadow_traffic_is_one_shadow_event_per_request():
    scenario = Scenario("e", (VariantProfile("A", 0.5, 0.1, error_rate=0.05), VariantProfile("B", 0.5, 0.1)),
                        shadows=(parse_shadow("model-v3:agree=0.8,errors=0.1,latency_ms=60"),))
    events = list(generate(scenario, 20_000, virtual_clock(1_000.0)))
    invocations = {e.event_id: e for e in events if isinstance(e, Invocation)}
    shadows = [e for e in events if isinstance(e, Shadow)]
    assert len(shadows) == len(invocations) == 20_000
    # Each shadow event follows its invocation and carries the served side's outcome.
    for before, event in zip(events, events[1:]):
        if isinstance(event, Shadow):
            assert isinstance(before, Invocation) and event.served_variant == before.variant
            assert (event.served_error, event.served_latency_ms, event.user_id) == (before.error, before.latency_ms,
                                                                                   before.user_id)
            assert (event.agree is None) == (event.error or event.served_error)
    compared = [e.agree for e in shadows if e.agree is not None]
    assert sum(e.error for e in shadows) / len(shadows) == pytest.approx(0.1, abs=0.01)
    assert sum(compared) / len(compared) == pytest.approx(0.8, abs=0.015)
    assert np.median([e.latency_ms for e in shadows]) == pytest.approx(60, rel=0.05)
    for bad, message in [("model-v3:speed=2", "unknown key"), ("model-v3:agree=2", r"\[0, 1\]"), (":agree=1", "NAME")]:
        with pytest.raises(ValueError, match=message):
            parse_shadow(bad)


def test_simulate_with_a_shadow_fills_the_shadow_windows(settings, engine, services):
    from click.testing import CliRunner

    from abflow.cli import main

    experiment_id = f"shadow-sim-{uuid.uuid4().hex[:6]}"
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "variants": [{"name": "A"}, {"name": "B"}],
        "shadows": [{"name": "model-v3", "model_version": "3"}]}))
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    worker = services("worker")
    result = CliRunner().invoke(main, ["simulate", "-e", experiment_id, "--events", "1500", "--rate", "0",
                                       "--shadow", "model-v3:agree=0.7,errors=0.04"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = next(line.split() for line in result.output.splitlines() if line.startswith("model-v3"))
    requests, errors = int(line[1]), int(line[2])
    assert requests == 1500 and errors > 0

    def sums():
        with engine.connect() as conn:
            return tuple(int(v) for v in conn.execute(text(
                "SELECT coalesce(sum(requests), 0), coalesce(sum(errors), 0) FROM shadow_windows "
                "WHERE experiment_id = :e"), {"e": experiment_id}).one())

    wait_until(lambda: sums()[0] >= requests, 60, message="the shadow events aggregated", workers=[worker])
    assert sums() == (requests, errors)
    report = build_report(load_report_input(engine, experiment_id))
    compared = sum(r["compared"] for r in report["shadows"])
    agreement = sum(r["agreement"] * r["compared"] for r in report["shadows"]) / compared
    assert agreement == pytest.approx(0.7, abs=0.05)

    undeclared = CliRunner().invoke(main, ["simulate", "-e", experiment_id, "--shadow", "model-v9"])
    assert undeclared.exit_code == 2 and "'model-v9' is not a shadow" in undeclared.output
