"""The Faust app: one agent reads both event topics in batches and hands them to the PostgreSQL sink.

Events are acknowledged to Faust (so their offsets may be committed to Kafka)
only after the sink's transaction committed; a batch that fails is retried
with backoff (PostgreSQL down, broker unreachable) and never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import psycopg
from confluent_kafka import KafkaException

from abflow.settings import Settings
from producers.contracts import CONVERSION, INVOCATION
from producers.publisher import Publisher, PublishError, ensure_topics
from stream_jobs.aggregate import Record
from stream_jobs.sink import BatchResult, PostgresSink, TopicIds

log = logging.getLogger("abflow.worker")

RETRYABLE = (psycopg.Error, KafkaException, PublishError, OSError)


def create_app(settings: Settings) -> faust.App:
    bootstrap = settings.require_kafka_bootstrap()
    settings.require_database_url()
    session_timeout = settings.kafka_session_timeout_seconds
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        datadir=str(settings.home / "worker"),
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=max(0.3, session_timeout / 10),
        broker_rebalance_timeout=max(session_timeout * 2, 5.0),
        broker_commit_interval=settings.kafka_commit_interval_seconds,
        broker_commit_every=settings.kafka_commit_every,
        topic_partitions=settings.partitions,
        stream_buffer_maxsize=max(4096, settings.batch_max_events * 2),
        broker_max_poll_records=max(500, settings.batch_max_events),
    )
    kinds = {settings.topics.invocations: INVOCATION, settings.topics.conversions: CONVERSION}
    source = app.topic(*kinds, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
    state: dict = {}
    totals = BatchResult()

    def sink() -> PostgresSink:
        if "sink" not in state:
            publisher = Publisher(bootstrap, settings.topics)
            state["sink"] = PostgresSink(settings, publisher, TopicIds(bootstrap))
        return state["sink"]

    async def apply(records: list[Record]) -> BatchResult:
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(sink().process, records)
            except RETRYABLE as exc:
                log.warning("batch of %d records not applied (%s: %s); retrying in %.1fs",
                            len(records), type(exc).__name__, str(exc).strip()[:300], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @app.agent(source)
    async def aggregate_events(stream):
        last_report = time.monotonic()
        async for events in stream.noack_take(settings.batch_max_events, within=settings.batch_max_seconds):
            records = [
                Record(m.topic, m.partition, m.offset, kinds[m.topic], m.key, m.value)
                for m in (event.message for event in events)
            ]
            result = await apply(records)
            if result.replayed:
                log.info("skipped %d records already applied (a replay after a restart or a rebalance)",
                         result.replayed)
            for event in events:
                await stream.ack(event)
            totals.counted += result.counted
            totals.duplicates += result.duplicates
            totals.replayed += result.replayed
            totals.dead_letters += result.dead_letters
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                log.info("applied so far: %d counted, %d duplicates, %d replayed, %d dead letters",
                         totals.counted, totals.duplicates, totals.replayed, totals.dead_letters)

    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the stream worker until SIGINT/SIGTERM."""
    settings.home.mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=True)
    worker.execute_from_commandline()
