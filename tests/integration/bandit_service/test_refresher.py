"""The weight refresher end to end: events in, weights out (history and compacted topic), replica takeover."""

from __future__ import annotations

import random
import uuid

import orjson
from confluent_kafka import Consumer
from sqlalchemy import text

from abflow.core.config import parse_config
from producers.publisher import Publisher, ensure_topics
from storage.queries import allocation_history
from storage.registry import create_experiment
from tests.conftest import wait_until
from tests.helpers import conversion, invocation, now, publish


def thompson_experiment(engine, warmup: int = 50) -> str:
    experiment_id = f"bandit-{uuid.uuid4().hex[:8]}"
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "strategy": "ThompsonSampling", "warmup": warmup, "min_weight": 0.02,
        "variants": [{"name": "Champion", "initial_weight": 0.5}, {"name": "Challenger", "initial_weight": 0.5}],
    }))
    return experiment_id


def publish_traffic(settings, experiment_id: str, users: int, rates: dict[str, float], seed: int) -> None:
    rng = random.Random(seed)
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        for i in range(users):
            variant = rng.choice(list(rates))
            user = f"u{seed}-{i}"
            publish(publisher, "invocation", invocation(experiment_id, variant, now() - 5, user))
            if rng.random() < rates[variant]:
                publish(publisher, "conversion", conversion(experiment_id, variant, now() - 4, user))


def latest(engine, experiment_id: str) -> dict | None:
    rows = allocation_history(engine, experiment_id, 1)
    return rows[0] if rows else None


def topic_records(bootstrap: str, topic: str, key: str, at_least: int, timeout: float = 30) -> list[dict]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    found: list[dict] = []

    def more() -> bool:
        for message in consumer.consume(100, 0.5):
            if not message.error() and message.key() == key.encode():
                found.append(orjson.loads(message.value()))
        return len(found) >= at_least

    try:
        wait_until(more, timeout, interval=0, message=f"{at_least} allocation records for {key}")
    finally:
        consumer.close()
    return found


def test_weights_follow_the_aggregates_into_history_and_topic(settings, engine, services):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = thompson_experiment(engine)
    # A long poll interval: only the sink's NOTIFY can make the refresher react in time.
    worker, refresher = services("worker"), services("refresher", "--poll-seconds", "600")
    wait_until(lambda: latest(engine, experiment_id) is not None, 60, message="the first weights",
               workers=[worker, refresher])
    first = latest(engine, experiment_id)
    assert (first["version"], first["phase"], first["weights"]) == (1, "warmup", {"Champion": 0.5, "Challenger": 0.5})

    publish_traffic(settings, experiment_id, 3000, {"Champion": 0.02, "Challenger": 0.25}, seed=1)
    wait_until(lambda: (latest(engine, experiment_id) or {}).get("weights", {}).get("Challenger", 0) > 0.9, 60,
               message="weights to move to the better variant", workers=[worker, refresher])

    history = allocation_history(engine, experiment_id, 1000)
    versions = [row["version"] for row in history]
    assert versions == list(range(len(history), 0, -1))  # contiguous, newest first
    newest = history[0]
    assert newest["phase"] == "ThompsonSampling"
    assert abs(sum(newest["weights"].values()) - 1.0) < 1e-9
    assert min(newest["weights"].values()) >= 0.02 - 1e-12  # the configured minimum weight
    used = newest["statistics"]["variants"]
    with engine.connect() as conn:
        totals = dict(conn.execute(text(
            "SELECT variant, invocations FROM variant_totals WHERE experiment_id = :e"), {"e": experiment_id}).all())
    assert all(0 < used[v]["invocations"] <= totals[v] for v in totals)
    assert newest["statistics"]["policy"]["p_best"]["Challenger"] > 0.9

    records = topic_records(settings.kafka_bootstrap, settings.topics.allocations, experiment_id, len(history))
    assert [r["version"] for r in records][-1] == newest["version"]
    assert records[-1]["weights"] == newest["weights"]
    assert {r["version"] for r in records} == set(versions)  # every version reached the topic


def used_invocations(engine, experiment_id: str) -> int:
    """Invocations in the statistics behind the newest weights."""
    row = latest(engine, experiment_id)
    return 0 if row is None else sum(v["invocations"] for v in row["statistics"]["variants"].values())


def test_one_refresher_leads_and_a_standby_takes_over(settings, engine, services):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = thompson_experiment(engine, warmup=10)
    worker = services("worker")
    first = services("refresher", "--poll-seconds", "600", name="first")
    wait_until(lambda: "leading" in first.log(), 30, message="a leader", workers=[first])
    second = services("refresher", "--poll-seconds", "600", name="second")
    wait_until(lambda: "standing by" in second.log(), 30, message="a standby", workers=[second])
    # Equal rates keep the posterior moving, so new data always means new weights.
    publish_traffic(settings, experiment_id, 500, {"Champion": 0.1, "Challenger": 0.1}, seed=2)
    wait_until(lambda: used_invocations(engine, experiment_id) == 500, 60, message="weights from all 500 users",
               workers=[worker, first, second])
    assert f"experiment {experiment_id}" not in second.log()  # the standby wrote nothing
    before = latest(engine, experiment_id)["version"]

    first.kill()  # SIGKILL: its session ends, and the lock with it
    publish_traffic(settings, experiment_id, 500, {"Champion": 0.1, "Challenger": 0.1}, seed=3)
    wait_until(lambda: used_invocations(engine, experiment_id) == 1000, 60,
               message="the standby to take over and use every aggregate", workers=[worker, second])
    assert "leading" in second.log()
    history = allocation_history(engine, experiment_id, 1000)
    assert [row["version"] for row in history] == list(range(len(history), 0, -1))  # no version twice, none skipped
    assert history[0]["version"] > before
