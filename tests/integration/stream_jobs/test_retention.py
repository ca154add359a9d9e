"""Records the broker deleted before a worker counted them (retention while the workers were stopped):
counted as lost to retention, exactly, and every other event counted. Apache Kafka only: the embedded
broker keeps every record, and it exits when asked to delete some."""

from __future__ import annotations

import urllib.request

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from abflow.local.stack import free_port, wait_for_port
from producers.publisher import Publisher, ensure_topics, log_start_offsets
from tests.conftest import wait_until
from tests.helpers import (
    Expected,
    assert_units_match,
    assert_windows_match,
    counted_events,
    invocation,
    make_experiment,
    now,
    publish,
)


def worker_counters(port: int) -> dict[tuple[str, str], float]:
    """The worker's counters by (sample name, topic)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    return {(s.name, s.labels.get("topic", "")): s.value for f in families for s in f.samples}


def test_records_deleted_before_they_were_counted_are_lost_to_retention_and_the_rest_counted(
        stack, settings, engine, run_env, services):
    if stack.kind == "embedded":
        pytest.skip("the embedded broker has no retention (and exits on a request to delete records)")
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    topic = settings.topics.invocations
    experiment_id = make_experiment(engine)
    port = free_port()
    run_env["ABFLOW_WORKER_METRICS_PORT"] = str(port)
    expected = Expected()
    t0 = now() - 120

    def publish_counted(prefix: str, n: int) -> None:
        with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
            for i in range(n):
                event = invocation(experiment_id, ("Champion", "Challenger")[i % 2], t0 + i * 0.1, f"{prefix}-{i}")
                publish(publisher, "invocation", event)
                expected.add("invocation", event)

    # Counted before the workers stop.
    publish_counted("before", 400)
    worker = services("worker")
    wait_until(lambda: counted_events(engine, [experiment_id]) == expected.events, 60, message="the first 400",
               workers=[worker])
    worker.stop()

    # Published while no worker runs; then retention deletes the first half of each partition's share.
    delivered: list[tuple[int, int, dict]] = []  # partition, offset, event
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for i in range(600):
        event = invocation(experiment_id, ("Champion", "Challenger")[i % 2], t0 + 50 + i * 0.1, f"away-{i}")
        producer.produce(topic, orjson.dumps(event), key=event["user_id"],
                         on_delivery=lambda err, msg, event=event: err is None and delivered.append(
                             (msg.partition(), msg.offset(), event)))
    assert producer.flush(30) == 0 and len(delivered) == 600
    cut: dict[int, int] = {}
    for partition in range(settings.partitions):
        offsets = sorted(offset for p, offset, _ in delivered if p == partition)
        if offsets:
            cut[partition] = offsets[len(offsets) // 2]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, p, offset) for p, offset in cut.items()]).values():
        future.result()
    starts = log_start_offsets(settings.kafka_bootstrap, [(topic, p) for p in cut])
    assert starts == {(topic, p): offset for p, offset in cut.items()}
    deleted = 0
    for partition, offset, event in delivered:
        if offset < cut[partition]:
            deleted += 1
        else:
            expected.add("invocation", event)
    assert 0 < deleted < 600

    # Published after, and a worker again: it resumes past the deleted records.
    publish_counted("after", 200)
    worker = services("worker")
    wait_for_port(port, 60, worker.process, "the worker's metrics")
    wait_until(lambda: counted_events(engine, [experiment_id]) >= expected.events, 90,
               message="every event still kept", workers=[worker])
    wait_until(lambda: worker_counters(port).get(("abflow_worker_lost_to_retention_total", topic)) == deleted, 30,
               message=f"{deleted} records counted as lost to retention", workers=[worker])
    assert counted_events(engine, [experiment_id]) == expected.events
    assert_windows_match(engine, expected)
    assert_units_match(engine, expected)
    counters = worker_counters(port)
    assert counters[("abflow_worker_offset_gaps_total", topic)] == 0  # not mistaken for a broker fault
    assert counters[("abflow_worker_offset_rereads_total", topic)] == 0
    assert "deleted by the topic's retention before a worker counted them" in worker.log()
