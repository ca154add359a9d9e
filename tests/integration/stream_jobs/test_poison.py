"""No single record stops the worker: poison records mixed into good ones on both event topics.

Out-of-range numbers (which overflowed PostgreSQL's sums before the contract bounded them), a null
reward (what a NaN becomes in orjson and JavaScript), a record over the producer's 1 MB default,
and records that PostgreSQL itself refuses (here by a CHECK constraint on the unit rows, a real
refusal by the real database) sit between good events. Every good event is counted exactly once,
every poison record is a dead letter with its reason, and the worker stays up and healthy.
"""

from __future__ import annotations

import hashlib
import random

import orjson
from sqlalchemy import text

from producers.publisher import Publisher, ensure_topics
from stream_jobs.source import healthy
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
    stream_counters,
)
from tests.integration.stream_jobs.test_pipeline import dead_letter_counts, read_topic

REFUSED_UNIT = "refused-unit"


def test_poison_records_are_dead_letters_and_every_good_event_counts(settings, engine, workers):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine, ("Champion", "Challenger"))
    constraint = f"refuse_{experiment_id.replace('-', '_')}"
    # The database refuses the unit row of one unit of this experiment: a refusal tied to records.
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE unit_state ADD CONSTRAINT {constraint} "
                          f"CHECK (experiment_id <> '{experiment_id}' OR unit_id <> '{REFUSED_UNIT}') NOT VALID"))
    try:
        rng = random.Random(11)
        t0 = now() - 300
        base = invocation(experiment_id, "Champion", t0, "poison-user")
        big = orjson.dumps({**base, "pad": "x" * 1_500_000})
        poison: list[tuple[str, bytes, str]] = [
            ("conversion", orjson.dumps(conversion(experiment_id, "Champion", t0, "p1", reward=1e308)), "out_of_range"),
            ("conversion", orjson.dumps(conversion(experiment_id, "Champion", t0, "p1", reward=1e308)), "out_of_range"),
            ("invocation", orjson.dumps({**base, "latency_ms": 1e308}), "out_of_range"),
            ("conversion", orjson.dumps({**conversion(experiment_id, "Challenger", t0, "p2"),
                                         "values": {"revenue": 1e308}}), "out_of_range"),
            ("conversion", orjson.dumps({**conversion(experiment_id, "Challenger", t0, "p3"), "reward": None}),
             "wrong_type"),
            ("invocation", big, "oversize"),
            ("invocation", orjson.dumps(invocation(experiment_id, "Champion", t0 + 1, REFUSED_UNIT)),
             "refused_by_database"),
            ("invocation", orjson.dumps(invocation(experiment_id, "Challenger", t0 + 2, REFUSED_UNIT)),
             "refused_by_database"),
        ]
        good = []
        for _ in range(2000):
            user, variant, ts = f"user-{rng.randrange(300)}", rng.choice(["Champion", "Challenger"]), t0 + rng.uniform(0, 240)
            if rng.random() < 0.75:
                good.append(("invocation", invocation(experiment_id, variant, ts, user, latency_ms=rng.uniform(1, 90))))
            else:
                good.append(("conversion", conversion(experiment_id, variant, ts, user, reward=round(rng.uniform(0, 9), 2))))
        poison_after = {200 * (i + 1): item for i, item in enumerate(poison)}
        expected = Expected()
        worker = workers()
        with Publisher(settings.kafka_bootstrap, settings.topics, config={"message.max.bytes": 4_000_000}) as publisher:
            for i, (kind, event) in enumerate(good):
                publish(publisher, kind, event)
                expected.add(kind, event)
                if i in poison_after:  # keyed like the good event before it: the same partition and batch
                    poison_kind, raw, _ = poison_after[i]
                    publish(publisher, poison_kind, raw, key=event["user_id"])
            publisher.flush()

        wait_until(lambda: counted_events(engine, [experiment_id]) >= expected.events, 120,
                   message="every good event", workers=[worker])
        want: dict[str, int] = {}
        for _, _, reason in poison:
            want[reason] = want.get(reason, 0) + 1
        topics = [settings.topics.invocations, settings.topics.conversions]
        wait_until(lambda: dead_letter_counts(engine, topics) == want, 60, message=f"dead letters {want}",
                   workers=[worker])
        assert counted_events(engine, [experiment_id]) == expected.events
        assert stream_counters(engine, topics) == {"counted": expected.events, "duplicates": 0,
                                                   "dead_letters": len(poison)}
        assert_windows_match(engine, expected)
        assert_units_match(engine, expected)
        assert worker.alive() and healthy(settings), worker.log()[-3000:]

        records = read_topic(settings.kafka_bootstrap, settings.topics.dead_letters, len(poison))
        assert len(records) == len(poison)
        reasons = sorted(dict(m.headers())["abflow.reason"].decode() for m in records)
        assert reasons == sorted(reason for _, _, reason in poison)
        oversize = [m for m in records if dict(m.headers())["abflow.reason"] == b"oversize"][0]
        headers = dict(oversize.headers())
        assert len(oversize.value()) == settings.max_event_bytes and big.startswith(oversize.value())
        assert headers["abflow.original.bytes"] == str(len(big)).encode()
        assert headers["abflow.original.sha256"] == hashlib.sha256(big).hexdigest().encode()
        refused = [dict(m.headers()) for m in records if dict(m.headers())["abflow.reason"] == b"refused_by_database"]
        assert all(constraint.encode() in h["abflow.detail"] for h in refused), refused
        assert "PostgreSQL refuses the record" in worker.log()
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE unit_state DROP CONSTRAINT IF EXISTS {constraint}"))
