"""Layers: experiments of one layer never share a unit; experiments of different layers are independent."""

from __future__ import annotations

import uuid
from collections import Counter

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from scipy import stats
from sqlalchemy import text

from abflow.core.buckets import LAYER_BUCKETS, choose, free_range, hash_point, layer_size
from abflow.core.config import ConfigError, parse_config
from abflow.settings import libpq_url
from bandit_service.allocations import publish_allocation
from bandit_service.lifecycle import change_status
from bandit_service.refresher import WeightRefresher
from producers.publisher import Publisher, ensure_topics
from producers.sdk import ServingClient
from storage.registry import LayerFull, create_experiment
from tests.conftest import wait_until
from tests.helpers import Assigner

UNITS = [f"user-{i}" for i in range(6000)]


def layered(engine, layer: str | None, traffic: float, prefix: str = "layer") -> str:
    experiment_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    config = {"experiment_id": experiment_id, "strategy": "WeightedSampling", "traffic": traffic,
              "variants": [{"name": "A", "initial_weight": 0.5}, {"name": "B", "initial_weight": 0.5}]}
    if layer is not None:
        config["layer"] = layer
    create_experiment(engine, parse_config(config))
    return experiment_id


def whole_topic(bootstrap: str, topic: str) -> list[dict]:
    """Every record on the topic, read to the end of each partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.partition.eof": True, "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records, ended = [], set()
    try:
        while ended != set(partitions):
            for message in consumer.consume(500, 1.0):
                if message.error() is None:
                    records.append(orjson.loads(message.value()))
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    ended.add(message.partition())
    finally:
        consumer.close()
    return records


@pytest.fixture
def conn(stack):
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as connection:
        yield connection


@pytest.fixture
def assigned(stack):
    with Assigner(stack.database_url) as assigner:
        yield assigner


def test_free_range_takes_the_first_gap_or_the_preferred_one():
    assert free_range([], 5000) == (0, 5000)
    assert free_range([(0, 3000), (5000, 10000)], 2000) == (3000, 5000)
    assert free_range([(0, 3000), (5000, 10000)], 2001) is None
    assert free_range([(2000, 4000)], 2000) == (0, 2000)
    assert free_range([(2000, 4000)], 3000) == (4000, 7000)
    assert free_range([(2000, 4000)], 2000, prefer=(6000, 8000)) == (6000, 8000)
    assert free_range([(2000, 4000)], 2000, prefer=(3000, 5000)) == (0, 2000)  # preferred range is taken
    assert layer_size(0.25) == 2500 and layer_size(1e-9) == 1 and layer_size(1.0) == LAYER_BUCKETS


def test_config_checks_layer_and_traffic():
    base = {"experiment_id": "x", "variants": [{"name": "A"}, {"name": "B"}]}
    with pytest.raises(ConfigError, match="traffic"):
        parse_config({**base, "traffic": 0})
    with pytest.raises(ConfigError, match="traffic"):
        parse_config({**base, "traffic": 1.5})
    with pytest.raises(ConfigError, match="layer"):
        parse_config({**base, "layer": "has space"})


def test_one_layer_is_exclusive_and_layers_are_independent(engine, conn, assigned):
    ranking, pricing = f"ranking-{uuid.uuid4().hex[:6]}", f"pricing-{uuid.uuid4().hex[:6]}"
    first, second = layered(engine, ranking, 0.6), layered(engine, ranking, 0.4)
    with pytest.raises(LayerFull, match="no free run of 10.0%"):
        layered(engine, ranking, 0.1)
    other = layered(engine, pricing, 1.0)

    results = {e: [assigned(e, unit) for unit in UNITS] for e in (first, second, other)}
    inside = {e: [a.in_experiment for a in results[e]] for e in results}
    # Exclusive: no unit is in both experiments of the ranking layer, and every unit is in one of them.
    assert not any(a and b for a, b in zip(inside[first], inside[second]))
    assert all(a or b for a, b in zip(inside[first], inside[second]))
    assert all(inside[other])
    share = sum(inside[first]) / len(UNITS)
    assert stats.binomtest(sum(inside[first]), len(UNITS), 0.6).pvalue > 0.001, share
    # Units outside get the champion, unstored, so they log nothing for the experiment.
    outside = [a for a in results[first] if not a.in_experiment]
    assert {a.variant for a in outside} == {"A"} and not any(a.stored for a in outside)
    with conn.cursor() as cur:
        stored = cur.execute("SELECT count(*) FROM assignments WHERE experiment_id = %s", (first,)).fetchone()[0]
    assert stored == sum(inside[first])
    # Inside an experiment, the variant split does not depend on the layer bucket: still 50/50.
    split = Counter(a.variant for a in results[first] if a.in_experiment)
    assert stats.chisquare([split["A"], split["B"]]).pvalue > 0.001

    # Independent across layers: the ranking cell a unit is in (experiment × variant) says
    # nothing about its pricing variant (chi-square test of independence).
    ranking_cell = [(e, a.variant) for pair in zip(results[first], results[second])
                    for e, a in zip((first, second), pair) if a.in_experiment]
    table = Counter(zip(ranking_cell, (a.variant for a in results[other])))
    rows, columns = sorted({r for r, _ in table}), ["A", "B"]
    contingency = [[table[(r, c)] for c in columns] for r in rows]
    assert len(rows) == 4
    assert stats.chi2_contingency(contingency).pvalue > 0.001
    # The check can fail: two experiments hashed with one salt are perfectly dependent.
    same_salt = [[sum(1 for u in UNITS if choose({"A": 1, "B": 1}, hash_point("one", u)) == r
                      and choose({"A": 1, "B": 1}, hash_point("one", u)) == c) for c in columns] for r in columns]
    assert stats.chi2_contingency(same_salt).pvalue < 1e-100

    # A stopped experiment frees its share: a new one fits again.
    conn.execute("UPDATE experiments SET status = 'stopped' WHERE experiment_id = %s", (second,))
    third = layered(engine, ranking, 0.4)
    with engine.connect() as sa_conn:
        start, end = sa_conn.execute(text("SELECT layer_start, layer_end FROM experiments WHERE experiment_id = :e"),
                                     {"e": third}).one()
    assert (start, end) == (6000, 10000)


def test_the_sdk_keeps_the_layer_like_the_api(settings, engine, assigned):
    """Both serving paths hash the same way: the SDK puts each unit where the API does."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    layer = f"search-{uuid.uuid4().hex[:6]}"
    layered(engine, layer, 0.5)
    experiment_id = layered(engine, layer, 0.3)
    with psycopg.connect(settings.libpq_url) as tx, Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        publish_allocation(tx, publisher, settings.topics.allocations, experiment_id, "WeightedSampling",
                           "WeightedSampling", {"A": 0.5, "B": 0.5}, {})
    with ServingClient(settings.kafka_bootstrap, settings.topics) as client:
        assert client.wait_ready(30)
        wait_until(lambda: client._serving.get(experiment_id) is not None, 30, message="the weights in the SDK")
        units = UNITS[:2000]
        sdk = [client.assign(experiment_id, u) for u in units]
        api = [assigned(experiment_id, u) for u in units]
        assert [s.in_experiment for s in sdk] == [a.in_experiment for a in api]
        assert [s.variant for s in sdk] == [a.variant for a in api]
        assert 0.25 < sum(s.in_experiment for s in sdk) / len(units) < 0.35
        # Events of units outside the experiment are not logged.
        for served in sdk:
            client.invocation(served, latency_ms=5.0)
        client.publisher.flush()
    expected = sum(s.in_experiment for s in sdk)
    logged = [r for r in whole_topic(settings.kafka_bootstrap, settings.topics.invocations)
              if r["experiment_id"] == experiment_id]
    assert len(logged) == expected


def test_a_layer_stays_exclusive_through_stop_and_restarts(settings, engine, assigned):
    """A stopped experiment claims no unit, on either serving path, once another took its share of the
    layer; serving processes that start afterwards, or read a republished topic, agree."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    layer = f"ranking-{uuid.uuid4().hex[:6]}"
    first, second = layered(engine, layer, 0.5), layered(engine, layer, 0.5)
    units = UNITS[:3000]

    def claims(assign_one, experiments) -> list[int]:
        """Per unit: how many of ``experiments`` say it is in them."""
        return [sum(assign_one(e, u).in_experiment for e in experiments) for u in units]

    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            for experiment_id in (first, second):
                publish_allocation(conn, publisher, settings.topics.allocations, experiment_id, "WeightedSampling",
                                   "WeightedSampling", {"A": 0.5, "B": 0.5}, {})
        with ServingClient(settings.kafka_bootstrap, settings.topics) as before:
            assert before.wait_ready(30)
            wait_until(lambda: all(before._serving.get(e) for e in (first, second)), 30, message="the SDK's weights")
            before.assign(first, units[0])  # a unit this process placed, and remembers
            change_status(engine, publisher, settings.topics.allocations, first, "stop")
            third = layered(engine, layer, 0.5)  # takes the share the stopped experiment freed
            with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
                publish_allocation(conn, publisher, settings.topics.allocations, third, "WeightedSampling",
                                   "WeightedSampling", {"A": 0.5, "B": 0.5}, {})
            wait_until(lambda: before._serving[first].status == "stopped" and before._serving.get(third), 30,
                       message="the SDK to see the stop and the new experiment")
            running = (second, third)
            # A process that was serving all along: the stopped experiment claims nobody, not even
            # the unit it remembers; every unit is in exactly one running experiment.
            assert claims(before.assign, (first,)) == [0] * len(units)
            assert claims(before.assign, running) == [1] * len(units)
        assert claims(assigned, (first,)) == [0] * len(units)
        assert claims(assigned, running) == [1] * len(units)
        assert {assigned(first, u).variant for u in units} == {"A"}  # the champion, outside the experiment

        # Restarts: a refresher leader republishes every experiment's newest version with its
        # status, and a serving process that starts now reads the same.
        with psycopg.connect(settings.libpq_url, autocommit=True) as conn:
            WeightRefresher(settings, publisher).republish_latest(conn)
        with ServingClient(settings.kafka_bootstrap, settings.topics) as after:
            assert after.wait_ready(30)
            wait_until(lambda: all(after._serving.get(e) for e in (first, second, third)), 30,
                       message="the restarted SDK's weights")
            assert claims(after.assign, (first,)) == [0] * len(units)
            assert claims(after.assign, running) == [1] * len(units)
