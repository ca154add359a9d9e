"""The streaming spine end to end: Kafka -> `abflow worker` (Faust) -> PostgreSQL, exact."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timezone

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer
from sqlalchemy import text

from abflow.cli import main
from producers.publisher import Publisher, ensure_topics
from tests.conftest import wait_until
from tests.helpers import (
    Expected,
    assert_units_match,
    assert_windows_match,
    conversion,
    counted_events,
    invocation,
    make_experiment,
    now,
    publish,
    read_totals,
    stream_counters,
)


def dead_letter_counts(engine, topics) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT reason, sum(count) FROM dead_letter_counts WHERE topic = ANY(:t) GROUP BY reason"),
            {"t": list(topics)},
        )
        return {reason: int(count) for reason, count in rows}


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    records = []
    try:
        wait_until(lambda: records.extend(m for m in consumer.consume(500, 1.0) if not m.error()) or len(records) >= expected,
                   timeout, interval=0, message=f"{expected} records on {topic}")
    finally:
        consumer.close()
    return records


def test_exact_aggregates_with_duplicates_late_and_bad_events(settings, engine, workers):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    exp_a = make_experiment(engine, ("Champion", "Challenger"))
    exp_b = make_experiment(engine, ("Champion", "ChallengerX", "ChallengerY"))
    rng = random.Random(7)
    t0 = now() - 600
    expected = Expected()
    good: list[tuple[str, dict]] = []
    for _ in range(3000):
        experiment_id, variants = rng.choice([(exp_a, ["Champion", "Challenger"]),
                                              (exp_b, ["Champion", "ChallengerX", "ChallengerY"])])
        variant = rng.choice(variants)
        ts = t0 + rng.uniform(0, 540)
        user = f"user-{rng.randrange(500)}"
        if rng.random() < 0.8:
            event = invocation(experiment_id, variant, ts, user, latency_ms=round(rng.lognormvariate(3, 0.6), 3),
                               error=rng.random() < 0.05)
            good.append(("invocation", event))
        else:
            event = conversion(experiment_id, variant, ts, user, reward=round(rng.uniform(0.5, 20), 2))
            good.append(("conversion", event))
    # ISO timestamps are part of the contract too.
    iso = invocation(exp_a, "Champion", datetime.fromtimestamp(t0 + 30, timezone.utc).isoformat(), "iso-user")
    good.append(("invocation", iso))
    # Late events: windows half an hour older than everything else, published last.
    late = [("invocation", invocation(exp_b, "ChallengerY", t0 - 1800 + rng.uniform(0, 120), f"late-{i}", error=i % 3 == 0))
            for i in range(100)]
    late += [("conversion", conversion(exp_a, "Challenger", t0 - 1800 + rng.uniform(0, 120), f"late-{i}", reward=2.5))
             for i in range(50)]

    valid_base = invocation(exp_a, "Champion", now(), "bad-user")
    bad: list[tuple[str, bytes, str]] = [
        ("invocation", b"{not json", "malformed_json"),
        ("invocation", b"[1, 2, 3]", "not_an_object"),
        ("invocation", orjson.dumps({k: v for k, v in valid_base.items() if k != "user_id"}), "missing_field"),
        ("invocation", orjson.dumps({**valid_base, "variant": 7}), "wrong_type"),
        ("invocation", orjson.dumps({**valid_base, "propensity": 1.5}), "invalid_value"),
        ("conversion", orjson.dumps({**valid_base, "reward": 1}).replace(b'"reward":1', b'"reward":NaN'), "non_finite"),
        ("invocation", orjson.dumps({**valid_base, "latency_ms": 1}).replace(b'"latency_ms":1', b'"latency_ms":1e999'),
         "non_finite"),
        ("invocation", orjson.dumps({**valid_base, "experiment_id": "no-such-experiment"}), "unknown_experiment"),
        ("conversion", orjson.dumps({**valid_base, "variant": "NoSuchVariant"}), "unknown_variant"),
        ("invocation", orjson.dumps({**valid_base, "timestamp": now() + 3600}), "timestamp_in_future"),
        ("invocation", orjson.dumps({**valid_base, "timestamp": now() - 30 * 24 * 3600}), "too_late"),
        ("invocation", orjson.dumps({**valid_base, "model_version": "x" * 100} | {"pad": "y" * 70_000}), "oversize"),
    ]
    worker = workers()
    bad_after = {150 * (i + 1): item for i, item in enumerate(bad)}
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        # Bad events sit between good ones, keyed alike: same partitions, same batches.
        for i, (kind, event) in enumerate(good):
            publish(publisher, kind, event)
            expected.add(kind, event)
            if i in bad_after:
                bad_kind, raw, _ = bad_after[i]
                publish(publisher, bad_kind, raw, key=event["user_id"])
        # Duplicates: the same events again (a producer retry, an upstream replay).
        for kind, event in rng.sample(good, 300):
            publish(publisher, kind, event)
        publisher.flush()
        wait_until(lambda: counted_events(engine, [exp_a, exp_b]) >= expected.events, 90,
                   message="the in-order events", workers=[worker])
        # Late events after newer windows were written; and more duplicates, of both.
        for kind, event in late:
            publish(publisher, kind, event)
            expected.add(kind, event)
        for kind, event in rng.sample(good, 200) + late[:20]:
            publish(publisher, kind, event)
        publisher.flush()

    wait_until(lambda: counted_events(engine, [exp_a, exp_b]) >= expected.events, 90, message="all events", workers=[worker])
    want_dead = {}
    for _, _, reason in bad:
        want_dead[reason] = want_dead.get(reason, 0) + 1
    topics = [settings.topics.invocations, settings.topics.conversions]
    wait_until(lambda: dead_letter_counts(engine, topics) == want_dead, 30, message="dead-letter counts")
    assert counted_events(engine, [exp_a, exp_b]) == expected.events
    assert stream_counters(engine, topics) == {"counted": expected.events, "duplicates": 300 + 200 + 20,
                                               "dead_letters": len(bad)}
    assert_windows_match(engine, expected)
    assert_units_match(engine, expected)
    totals = read_totals(engine, [exp_a, exp_b])
    for key, row in expected.totals().items():
        assert totals[key]["invocations"] == row["invocations"]
        assert totals[key]["conversions"] == row["conversions"]
        assert totals[key]["reward_sum"] == pytest.approx(row["reward_sum"])
        assert totals[key]["errors"] == row["errors"]

    # Operators read the same counts, per topic and reason, with `abflow dead-letters`.
    per_topic: dict[tuple[str, str], int] = {}
    for kind, _, reason in bad:
        topic = settings.topics.invocations if kind == "invocation" else settings.topics.conversions
        per_topic[(topic, reason)] = per_topic.get((topic, reason), 0) + 1
    listed = {tuple(line.split()[:3]) for line in CliRunner().invoke(main, ["dead-letters"]).output.splitlines()}
    for (topic, reason), count in per_topic.items():
        assert (topic, reason, str(count)) in listed, (topic, reason, count)

    # The dead-letter topic holds each bad record once, with its reason and the original bytes.
    records = read_topic(settings.kafka_bootstrap, settings.topics.dead_letters, len(bad))
    assert len(records) == len(bad)
    by_value = {m.value(): dict(m.headers()) for m in records}
    for kind, raw, reason in bad:
        # A value over the event size limit keeps its first bytes, with its original size.
        headers = by_value[raw[:settings.max_event_bytes]]
        if len(raw) > settings.max_event_bytes:
            assert headers["abflow.original.bytes"] == str(len(raw)).encode()
        assert headers["abflow.reason"].decode() == reason
        assert headers["abflow.detail"]
        assert headers["abflow.source.topic"].decode() == (
            settings.topics.invocations if kind == "invocation" else settings.topics.conversions)
    assert worker.alive(), worker.log()[-3000:]
