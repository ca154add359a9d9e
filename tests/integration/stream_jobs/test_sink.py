"""The PostgreSQL sink on its own, against the real PostgreSQL and broker: replays, races, recreated topics."""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import text

from producers.contracts import CONVERSION, INVOCATION
from producers.publisher import Publisher, ensure_topics, topic_ids
from stream_jobs.checkpoint import TopicIds
from stream_jobs.dead_letters import KafkaDeadLetters
from stream_jobs.dedup import RECENT_MAX_IDS, Digests, PartitionDedup
from stream_jobs.records import Record
from stream_jobs.sink import PostgresSink
from tests.conftest import wait_until
from tests.helpers import conversion, counted_events, invocation, make_experiment, now


@pytest.fixture
def new_sink(settings):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    made = []

    def make() -> PostgresSink:
        dead_letters = KafkaDeadLetters(Publisher(settings.kafka_bootstrap, settings.topics), settings.topics.dead_letters)
        sink = PostgresSink(settings, dead_letters, TopicIds(settings.kafka_bootstrap))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def records(topic: str, experiment_id: str, offsets, partition: int = 0, event_ids=None, first_user: int = 0
            ) -> list[Record]:
    ts = now() - 120
    out = []
    for offset in offsets:
        event_id = event_ids(offset) if event_ids else f"{topic}-{partition}-{offset}"
        event = invocation(experiment_id, "Champion", ts, f"user-{first_user + offset}", event_id=event_id)
        out.append(Record(topic, partition, offset, INVOCATION, event["user_id"].encode(), orjson.dumps(event)))
    return out


def test_replayed_offsets_are_skipped(settings, engine, new_sink):
    experiment_id = make_experiment(engine)
    topic = settings.topics.invocations
    sink = new_sink()
    assert sink.process(records(topic, experiment_id, range(0, 100))).counted == 100
    result = sink.process(records(topic, experiment_id, range(50, 150)))
    assert (result.replayed, result.counted) == (50, 50)
    assert counted_events(engine, [experiment_id]) == 150


def test_two_sinks_on_one_partition_never_double_count(settings, engine, new_sink):
    """A rebalance race: the old owner's in-flight batch lands after the new owner's."""
    experiment_id = make_experiment(engine)
    topic = settings.topics.invocations
    old_owner, new_owner = new_sink(), new_sink()
    assert old_owner.process(records(topic, experiment_id, range(0, 100))).counted == 100
    # The new owner resumes from an older Kafka commit (offset 0) and reads further.
    result = new_owner.process(records(topic, experiment_id, range(0, 200)))
    assert (result.replayed, result.counted) == (100, 100)
    # The old owner's stale batch overlaps both; plus a re-sent copy of event 10 at a new offset.
    stale = records(topic, experiment_id, range(150, 250))
    stale += records(topic, experiment_id, [250], event_ids=lambda _: f"{topic}-0-10")
    result = old_owner.process(stale)
    assert (result.replayed, result.counted, result.duplicates) == (50, 50, 1)
    assert counted_events(engine, [experiment_id]) == 250


def test_a_batch_that_starts_where_its_sink_stopped_is_still_checked_against_another_writer(
        settings, engine, new_sink):
    """A rebalance race: the old owner's next batch starts exactly where it stopped, but the new owner
    has applied further meanwhile. The stored offsets, not what the old owner remembers, decide: it
    counts nothing twice, and goes on from where the partition stands."""
    experiment_id = make_experiment(engine)
    topic = settings.topics.invocations
    old_owner, new_owner = new_sink(), new_sink()
    assert old_owner.process(records(topic, experiment_id, range(0, 100))).counted == 100
    assert new_owner.process(records(topic, experiment_id, range(0, 200))).counted == 100
    result = old_owner.process(records(topic, experiment_id, range(100, 150)))  # starts where it stopped
    assert (result.replayed, result.counted) == (50, 0)
    assert counted_events(engine, [experiment_id]) == 200
    assert old_owner.process(records(topic, experiment_id, range(200, 230))).counted == 30
    with engine.connect() as conn:
        assert conn.execute(text("SELECT next_offset FROM sink_offsets WHERE topic = :t AND partition = 0"),
                            {"t": topic}).scalar_one() == 230
    assert counted_events(engine, [experiment_id]) == 230


def test_dedup_ids_survive_a_new_sink(settings, engine, new_sink):
    experiment_id = make_experiment(engine)
    topic = settings.topics.conversions
    first = new_sink()
    ts = now() - 60
    events = [conversion(experiment_id, "Challenger", ts, f"u{i}", reward=2.0) for i in range(20)]
    batch = [Record(topic, 1, i, CONVERSION, None, orjson.dumps(e)) for i, e in enumerate(events)]
    assert first.process(batch).counted == 20
    first.close()
    # A restarted worker gets the same events again at new offsets (an upstream re-send).
    again = [Record(topic, 1, 100 + i, CONVERSION, None, orjson.dumps(e)) for i, e in enumerate(events)]
    result = new_sink().process(again)
    assert (result.counted, result.duplicates) == (0, 20)
    assert counted_events(engine, [experiment_id]) == 20


def describable(bootstrap: str, topic: str) -> bool:
    try:
        topic_ids(bootstrap, [topic])
        return True
    except KafkaException:
        return False


def test_recreated_topic_starts_again_at_offset_zero(settings, engine, new_sink):
    """A broker that lost its logs (the embedded one keeps them in memory) hands out offsets from 0 again."""
    experiment_id = make_experiment(engine)
    topic = settings.topics.invocations
    sink = new_sink()
    assert sink.process(records(topic, experiment_id, range(0, 100))).counted == 100
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_topics([topic], operation_timeout=10).values():
        future.result()
    deadline = time.monotonic() + 20
    while True:
        try:
            for future in admin.create_topics([NewTopic(topic, settings.partitions, 1)]).values():
                future.result()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # As a worker would: records of the new topic come once the broker serves its metadata (Apache
    # Kafka's broker learns a created topic from its controller a moment after the answer).
    wait_until(lambda: describable(settings.kafka_bootstrap, topic), 20, message=f"the broker to describe {topic}")
    new_events = records(topic, experiment_id, range(0, 30), event_ids=lambda offset: f"after-recreate-{offset}")
    result = sink.process(new_events)
    assert (result.replayed, result.counted) == (0, 30)
    assert counted_events(engine, [experiment_id]) == 130


class DeadLettersDownOnce:
    """Dead letters whose first delivery fails, as when the broker is unreachable for a moment."""

    def __init__(self):
        self.delivered: list = []
        self.failed = False

    def publish(self, rejected) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("dead-letter topic unreachable")
        self.delivered.extend(rejected)


def test_a_failed_lane_leaves_the_other_committed_and_the_retry_counts_each_event_once(settings, engine):
    """Partitions 0 and 1 are applied in two lanes at once (``sink_connections`` = 2). The lane of
    partition 1 fails; partition 0's commits. Applying the batch again skips partition 0's records
    as applied and counts partition 1's: every event once, in the windows and for the units."""
    assert settings.sink_connections == 2
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine)
    topic = settings.topics.invocations
    dead_letters = DeadLettersDownOnce()
    sink = PostgresSink(settings, dead_letters, TopicIds(settings.kafka_bootstrap))
    try:
        lane_0 = records(topic, experiment_id, range(0, 100), partition=0)
        lane_1 = records(topic, experiment_id, range(0, 100), partition=1, first_user=100)
        lane_1.append(Record(topic, 1, 100, INVOCATION, b"bad", b"not json"))
        batch = lane_0 + lane_1
        with pytest.raises(OSError, match="unreachable"):
            sink.process(batch)
        assert counted_events(engine, [experiment_id]) == 100
        result = sink.process(batch)
        assert (result.replayed, result.counted, result.dead_letters) == (100, 100, 1)
        assert len(dead_letters.delivered) == 1
        assert counted_events(engine, [experiment_id]) == 200
        with engine.connect() as conn:
            units, invocations = conn.execute(text(
                "SELECT count(*), sum(invocations) FROM unit_state WHERE experiment_id = :e"), {"e": experiment_id}).one()
            attributed = conn.execute(text("SELECT sum(invocations) FROM attributed_totals WHERE experiment_id = :e"),
                                      {"e": experiment_id}).scalar_one()
        assert (units, invocations, attributed) == (200, 200, 200)
    finally:
        sink.close()


def test_partition_dedup_forgets_a_minute_at_a_time_after_the_horizon():
    dedup = PartitionDedup()
    ids = ["a", "b", "c", "d", "e"]
    dedup.add(1000.0, ["a", "b"])
    dedup.add(1030.0, ["c"])  # the same minute as a and b
    dedup.add(1500.0, ["d"])
    assert dedup.seen_among(ids) == {"a", "b", "c", "d"} and len(dedup) == 4
    dedup.expire(older_than=1020.0)  # a and b are past it, but their minute's newest batch (c) is not
    assert dedup.seen_among(ids) == {"a", "b", "c", "d"}
    dedup.expire(older_than=1200.0)
    assert dedup.seen_among(ids) == {"d"}
    dedup.expire(older_than=2000.0)
    assert dedup.seen_among(ids) == set() and len(dedup) == 0


def test_partition_dedup_keeps_a_busy_minute_in_its_sorted_array():
    """A minute with more ids than the set of the newest holds (a worker catching up): they join the
    sorted array as they come, are all found, and go when their minute does."""
    dedup = PartitionDedup()
    counted = [f"event-{i}" for i in range(3 * RECENT_MAX_IDS + 100)]
    for start in range(0, len(counted), 1000):  # one batch a second: 50 batches within one minute
        dedup.add(1000.0 + start / 1000, counted[start:start + 1000])
    assert len(dedup) == len(counted)
    assert len(dedup._recent) < RECENT_MAX_IDS  # the rest are 16 bytes each in the array, not ~93 in the set
    never = [f"other-{i}" for i in range(len(counted))]
    assert dedup.seen_among(counted + never) == set(counted)
    dedup.add(1100.0, ["late"])  # the next minute
    assert dedup.seen_among(counted[:5] + ["late"]) == {*counted[:5], "late"}
    dedup.expire(older_than=1060.0)  # the busy minute's newest batch (1049) is past it
    assert dedup.seen_among(counted + ["late"]) == {"late"} and len(dedup) == 1


def test_digests_that_share_their_first_half_are_told_apart():
    """The sorted arrays are searched by the first 64 bits; digests equal there (a chance of 2^-64 a
    pair, so made up here) are compared whole."""
    held = Digests.of([b"A" * 8 + b"1" * 8, b"A" * 8 + b"2" * 8, b"A" * 8 + b"3" * 8, b"B" * 16, b"C" * 16])
    probe = Digests.of([b"A" * 8 + b"3" * 8, b"A" * 8 + b"4" * 8, b"A" * 8 + b"1" * 8, b"B" * 8 + b"A" * 8,
                        b"C" * 16, b"D" * 16])
    found = {first.tobytes() + second.tobytes() for first, second, hit
             in zip(probe.first, probe.second, held.contains(probe)) if hit}
    assert found == {b"A" * 8 + b"3" * 8, b"A" * 8 + b"1" * 8, b"C" * 16}


def test_partition_dedup_finds_every_id_it_holds_and_no_other():
    """Many minutes of ids in sorted digest arrays, probed with as many ids never counted."""
    dedup = PartitionDedup()
    counted = [f"event-{i}" for i in range(50_000)]
    for minute in range(10):
        dedup.add(1000.0 + 60 * minute, counted[minute * 5_000:(minute + 1) * 5_000])
    never = [f"other-{i}" for i in range(50_000)]
    assert dedup.seen_among(counted + never) == set(counted)

