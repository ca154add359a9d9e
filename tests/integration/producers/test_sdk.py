"""The serving SDK end to end: cached weights from the allocations topic, assignment, event logging."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psycopg
import pytest
from sqlalchemy import text

from abflow.core.buckets import choose, hash_point
from abflow.core.errors import ExperimentNotFound
from bandit_service.allocations import publish_allocation
from producers.publisher import Publisher, PublishError, ensure_topics
from producers.sdk import ServingClient, UndeclaredShadow
from tests.conftest import wait_until
from tests.helpers import counted_events, make_experiment
from tests.integration.bandit_service.test_refresher import latest, thompson_experiment

REFRESH_POLL_SECONDS = 5.0  # the refresher recomputes every experiment at least this often


def weights_settled(engine, experiment_id: str, invocations: int, rewards: float, since: dict) -> bool:
    """Whether the newest weights are final: computed from every invocation and conversion, or
    unchanged by a full refresh after the last of them was counted (a refresh that finds the same
    weights, e.g. held at min_weight, writes no new version)."""
    newest = latest(engine, experiment_id)
    with engine.connect() as conn:
        totals = {row.variant: (row.invocations, row.reward_sum) for row in conn.execute(text(
            "SELECT variant, invocations, reward_sum FROM variant_totals WHERE experiment_id = :e"),
            {"e": experiment_id})}
    used = {v: (s["invocations"], s["reward_sum"]) for v, s in newest["statistics"]["variants"].items()}
    complete = sum(n for n, _ in totals.values()) == invocations and sum(r for _, r in totals.values()) == rewards
    if not complete:
        return False
    if since.get("version") != newest["version"]:
        since.update(version=newest["version"], at=time.monotonic())
    return used == totals or time.monotonic() - since["at"] > REFRESH_POLL_SECONDS + 1


def has_weights(client: ServingClient, experiment_id: str) -> bool:
    try:
        client.weights(experiment_id)
        return True
    except ExperimentNotFound:
        return False


def test_sdk_routes_by_the_refreshed_weights_and_logs_propensities(settings, engine, services):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = thompson_experiment(engine, warmup=20)
    worker, refresher = services("worker"), services("refresher", "--poll-seconds", "600")
    with ServingClient(settings.kafka_bootstrap, settings.topics) as client:
        assert client.wait_ready(30)
        wait_until(lambda: has_weights(client, experiment_id), 30, message="the first weights in the SDK",
                   workers=[worker, refresher])
        assert client.weights(experiment_id) == (1, {"Champion": 0.5, "Challenger": 0.5})
        with pytest.raises(ExperimentNotFound):
            client.assign("no-such-experiment", "u")

        rng = random.Random(1)
        rates = {"Champion": 0.02, "Challenger": 0.3}
        early = {}
        conversions = 0
        for i in range(1500):
            served = client.assign(experiment_id, f"user-{i}")
            early[served.user_id] = served.variant
            client.invocation(served, latency_ms=10.0)
            if rng.random() < rates[served.variant]:
                client.conversion(served, reward=1.0)
                conversions += 1
        client.publisher.flush()
        first_split = Counter(early.values())
        assert abs(first_split["Challenger"] - 750) < 100  # 50/50 by hash while the weights were the initial ones

        wait_until(lambda: client.weights(experiment_id)[1]["Challenger"] > 0.9, 60,
                   message="the SDK to see the weights move", workers=[worker, refresher])
        later = Counter(client.assign(experiment_id, f"new-user-{i}").variant for i in range(1000))
        assert later["Challenger"] > 850
        # Users this process already served stay where they were.
        assert all(client.assign(experiment_id, user).variant == variant for user, variant in early.items())
        served = client.assign(experiment_id, "user-1")
        assert served.version == 1 and served.propensity == 0.5  # the propensity it was first served with
        # Session experiments randomise sessions: one user, several sessions, each drawn on its own.
        # (Once the weights have used every invocation they stop moving: compare against them.)
        settled: dict = {}
        wait_until(lambda: weights_settled(engine, experiment_id, 1500, conversions, settled), 60,
                   message="weights from all events", workers=[worker, refresher])
        final = latest(engine, experiment_id)["version"]
        wait_until(lambda: client.weights(experiment_id)[0] == final, 30, message="the SDK to have the final weights")
        _, weights = client.weights(experiment_id)
        for i in range(50):
            session = client.assign(experiment_id, "user-1", unit_id=f"session-{i}")
            assert session.variant == choose(weights, hash_point(experiment_id, f"session-{i}"))
            assert session.user_id == "user-1"

    wait_until(lambda: counted_events(engine, [experiment_id]) >= 1500, 60, message="SDK events aggregated",
               workers=[worker])
    with engine.connect() as conn:
        invocations = conn.execute(text("SELECT sum(invocations) FROM variant_windows WHERE experiment_id = :e"),
                                   {"e": experiment_id}).scalar_one()
    assert invocations == 1500


def test_unknown_experiment_without_weights(settings, engine):
    """Without weights (no refresher ran) the first assign waits its timeout, then says what to check."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine)
    with ServingClient(settings.kafka_bootstrap, settings.topics, weights_timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(ExperimentNotFound, match=experiment_id) as info:
            client.assign(experiment_id, "u1")
        assert 1.0 <= time.monotonic() - started < 10
        assert "`abflow serve`" in str(info.value) and settings.topics.allocations in str(info.value)


def test_assign_right_after_start_waits_for_the_first_weights(settings, engine):
    """Constructed and used at once (as a service does at start-up): the first assign waits for the
    weights to be read, or published, instead of failing."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine)
    with ServingClient(settings.kafka_bootstrap, settings.topics, weights_timeout=20) as client:
        def publish_later():
            time.sleep(1.5)
            with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
                publish_allocation(conn, client.publisher, settings.topics.allocations, experiment_id,
                                   "ThompsonSampling", "warmup", {"Champion": 0.5, "Challenger": 0.5}, {})

        threading.Thread(target=publish_later, daemon=True).start()
        started = time.monotonic()
        served = client.assign(experiment_id, "u1")
        assert served.variant in ("Champion", "Challenger") and time.monotonic() - started >= 1.0


def test_tee_with_a_shadow_the_experiment_does_not_declare_raises_at_once(settings, engine):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine)
    with psycopg.connect(settings.libpq_url, autocommit=True) as conn, \
            Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        publish_allocation(conn, publisher, settings.topics.allocations, experiment_id, "ThompsonSampling",
                           "warmup", {"Champion": 0.5, "Challenger": 0.5}, {})
    with ServingClient(settings.kafka_bootstrap, settings.topics) as client:
        served = client.assign(experiment_id, "u1")
        called = []
        with pytest.raises(UndeclaredShadow, match="'model-v9'.*declared: none"):
            client.tee(served, lambda: called.append("served"), {"model-v9": lambda: called.append("shadow")})
        assert called == []  # neither model ran: the mistake is the caller's


def test_a_publisher_without_a_broker_fails_fast_with_one_error():
    started = time.monotonic()
    with pytest.raises(PublishError, match="no Kafka broker answered at 127.0.0.1:9 within 2 s"):
        Publisher("127.0.0.1:9", connect_timeout=2)
    assert time.monotonic() - started < 10
