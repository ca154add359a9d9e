"""The stream worker: a Faust app whose agent aggregates batches of records into PostgreSQL.

Faust's per-record stream path tops out near 12k records/s on a 2-core
machine (see the README's benchmark figures), so records do not enter Faust one by one: a
confluent-kafka consumer thread (``BatchSource``) reads the event topics in
batches and sends each batch, as one value, through an in-memory Faust channel
to the ``aggregate_events`` agent. The agent validates, deduplicates and
aggregates the batch and applies it with the PostgreSQL sink in one
transaction. Only then are the batch's offsets stored for the consumer's next
Kafka commit; a batch that fails is retried with backoff (PostgreSQL down,
broker unreachable) and never skipped. Kafka's committed offsets only say
where to resume reading: the offsets the sink keeps beside the aggregates
decide what counts (see ``stream_jobs.sink``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import gc
import logging
import time

import faust
import mode
import psycopg
from confluent_kafka import KafkaException
from faust.app.base import BootStrategy

from abflow.settings import Settings
from producers.publisher import Publisher, PublishError, ensure_topics
from stream_jobs.checkpoint import TopicIds
from stream_jobs.dead_letters import KafkaDeadLetters
from stream_jobs.metrics import WorkerMetrics
from stream_jobs.records import Record
from stream_jobs.sink import BatchResult, PostgresSink, Validated
from stream_jobs.source import IN_FLIGHT_BATCHES, BatchSource, event_topics

log = logging.getLogger("abflow.worker")

RETRYABLE = (psycopg.Error, KafkaException, PublishError, OSError)
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


class BatchBoot(BootStrategy):
    """Faust starts agents, tasks and timers; Kafka is read by BatchSource, so no Faust consumer,
    producer, web server or sensors (its consumer would also join our group with another protocol)."""

    enable_kafka = False
    enable_web = False
    enable_sensors = False


def create_app(settings: Settings) -> faust.App:
    bootstrap = settings.require_kafka_bootstrap()
    settings.require_database_url()
    app = faust.App(
        settings.consumer_group,
        broker=f"kafka://{bootstrap}",
        web_enabled=False,
        datadir=str(settings.home / "worker"),
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=max(0.3, settings.kafka_session_timeout_seconds / 10),
    )
    app.boot_strategy = BatchBoot(app)
    batches = app.channel(maxsize=IN_FLIGHT_BATCHES)
    state: dict = {}
    totals = BatchResult()
    metrics = WorkerMetrics()
    for topic in event_topics(settings):  # at 0 from the start: an alert compares them with before
        metrics.offset_gaps.labels(topic)
        metrics.offset_rereads.labels(topic)
        metrics.lost_to_retention.labels(topic)
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port)

    def sink() -> PostgresSink:
        if "sink" not in state:
            # A dead letter keeps a whole record up to the event size limit, and stays well under the
            # producer's message limit (1 MB) whatever that limit is set to.
            dead_letters = KafkaDeadLetters(Publisher(bootstrap, settings.topics), settings.topics.dead_letters,
                                            max_value_bytes=min(settings.max_event_bytes, 512 * 1024))
            state["sink"] = PostgresSink(settings, dead_letters, TopicIds(bootstrap))
        return state["sink"]

    async def retrying(step, records: list[Record]):
        """``step()`` on a thread until it does not fail for a reason that passes (PostgreSQL down, broker unreachable)."""
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(step)
            except RETRYABLE as exc:
                log.warning("batch of %d records not applied (%s: %s); retrying in %.1fs",
                            len(records), type(exc).__name__, str(exc).strip()[:300], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def apply(batch: Validated) -> None:
        started = time.perf_counter()
        result = await retrying(lambda: sink().apply(batch), batch.records)
        metrics.batch_seconds.observe(time.perf_counter() - started)
        for topic, (counted, duplicates, dead) in result.per_topic.items():
            for outcome, n in (("counted", counted), ("duplicate", duplicates), ("dead_letter", dead)):
                metrics.events.labels(topic, outcome).inc(n)
        for (topic, reason), n in result.dead_letter_reasons.items():
            metrics.dead_letters.labels(topic, reason).inc(n)
        for topic, n in result.gaps.items():
            metrics.offset_gaps.labels(topic).inc(n)
        for topic, n in result.lost_to_retention.items():
            metrics.lost_to_retention.labels(topic).inc(n)
        state["source"].done(batch.records)
        if result.replayed:
            log.info("skipped %d records already applied (a replay after a restart or a rebalance)", result.replayed)
        totals.counted += result.counted
        totals.duplicates += result.duplicates
        totals.replayed += result.replayed
        totals.dead_letters += result.dead_letters
        if time.monotonic() - state.get("reported_at", 0.0) > 10:
            state["reported_at"] = time.monotonic()
            log.info("applied so far: %d counted, %d duplicates, %d replayed, %d dead letters",
                     totals.counted, totals.duplicates, totals.replayed, totals.dead_letters)

    async def apply_or_stop(batch: Validated) -> None:
        # A batch that fails for a reason no retry fixes (a bug, not an outage) stops the worker:
        # going on would skip it, since the next batches' offsets pass it. A restart resumes from
        # the offsets stored with the aggregates.
        try:
            await apply(batch)
        except Exception as exc:
            source = state.get("source")
            if source is not None and source.stopping.is_set():
                # Stopping (the sink's threads shut down under it): not applied, so its offsets are not
                # stored, and whoever reads the partitions next applies it.
                log.info("a batch of %d records was not applied: the worker is stopping", len(batch.records))
                return
            log.exception("a batch of %d records failed; stopping the worker", len(batch.records))
            await app.crash(exc)

    # The crashing supervisor stops the worker when the agent fails, instead of restarting it without
    # the batch it held.
    @app.agent(batches, supervisor_strategy=mode.CrashingSupervisor)
    async def aggregate_events(stream):
        # A two-stage pipeline: the next batch is validated (Python, on one thread) while this one's
        # transaction runs (mostly PostgreSQL's time, on another). Batches are applied one at a time,
        # in order.
        applying: asyncio.Future | None = None
        try:
            async for records in stream:
                batch = await retrying(lambda batch=records: sink().validate(batch), records)
                if applying is not None:
                    await applying
                applying = asyncio.ensure_future(apply_or_stop(batch))
        finally:
            if applying is not None:
                await applying

    @app.task
    async def read_batches() -> None:
        # Faust opens its flow control when its own consumer gets partitions; there is none.
        app.flow_control.resume()
        loop = asyncio.get_running_loop()

        def deliver(records: list[Record]) -> None:
            future = asyncio.run_coroutine_threadsafe(batches.send(value=records), loop)
            while not source.stopping.is_set():
                try:
                    future.result(timeout=0.5)
                    return
                except concurrent.futures.TimeoutError:
                    continue

        source = state["source"] = BatchSource(settings, deliver, metrics)
        source.start()
        while source.is_alive():
            await asyncio.sleep(0.5)
        if source.failure is not None and not source.stopping.is_set():
            await app.crash(source.failure)

    @app.on_before_shutdown.connect
    def stop_reading(sender, **kwargs) -> None:  # noqa: ARG001 - Faust's signal signature
        source = state.get("source")
        if source is not None:
            source.stopping.set()
            source.join(10)
        if "sink" in state:
            state["sink"].close()

    return app


def keep_large_blocks_out_of_the_heap() -> None:
    """Fix glibc's mmap threshold at its default (128 kB), so large blocks stay mmapped and go back to
    the system when freed.

    glibc raises the threshold each time it frees a large mmapped block. After that, the dedup's
    sorted arrays (megabytes each, made anew whenever ids join them) came from the heap and left
    holes there: in the soak, once the dedup horizon was full, the memory in use stayed flat while
    the heap's free space, and the RSS with it, grew (README, Soak). A fixed threshold turns off
    the raising. Other C libraries have no ``mallopt``: nothing to do."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the stream worker until SIGINT/SIGTERM."""
    settings.home.mkdir(parents=True, exist_ok=True)
    keep_large_blocks_out_of_the_heap()
    # A batch allocates ~10^4 short-lived objects: with the default gen-0 threshold (700)
    # the collector would run a dozen times per batch.
    gc.set_threshold(100_000, 50, 100)
    ensure_topics(settings.require_kafka_bootstrap(), settings.topics, settings.partitions)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=True)
    worker.execute_from_commandline()
