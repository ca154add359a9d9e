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
import collections
import concurrent.futures
import ctypes
import gc
import json
import logging
import os
import threading
import time

import faust
import mode
import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from faust.app.base import BootStrategy

from abflow.settings import Settings
from producers.contracts import CONVERSION, INVOCATION, SHADOW
from producers.publisher import Publisher, PublishError, ensure_topics
from stream_jobs.aggregate import Record
from stream_jobs.checkpoint import TopicIds
from stream_jobs.dead_letters import KafkaDeadLetters
from stream_jobs.metrics import WorkerMetrics
from stream_jobs.positions import ReadPositions
from stream_jobs.sink import BatchResult, PostgresSink, Validated

log = logging.getLogger("abflow.worker")

RETRYABLE = (psycopg.Error, KafkaException, PublishError, OSError)
IN_FLIGHT_BATCHES = 3  # one being applied, one being validated, one read ahead
HEARTBEAT_EVERY_S = 2.0
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
LAG_EVERY_S = 5.0  # how often librdkafka reports the consumer lag
FETCH_BYTES_PER_PARTITION = 128 * 1024
FETCH_WAIT_MS = 50  # how long the broker may hold a fetch that finds nothing new
UNASSIGNED_SESSIONS = 5  # session timeouts a worker may go without partitions before it warns
UNASSIGNED_MIN_S = 15.0


def heartbeat_path(settings: Settings):
    return settings.home / "worker.heartbeat"


def assigned_partitions(settings: Settings) -> list[str]:
    """The partitions the worker using this home last reported, [] before its first assignment."""
    try:
        return json.loads(heartbeat_path(settings).read_text()).get("assigned", [])
    except (OSError, ValueError):
        return []


def health(settings: Settings, max_age_s: float = 30.0) -> str | None:
    """None when a worker using this home read from Kafka within ``max_age_s`` and holds partitions
    (or has not yet waited long for them); else what is wrong."""
    path = heartbeat_path(settings)
    try:
        age = time.time() - path.stat().st_mtime
        beat = json.loads(path.read_text())
    except FileNotFoundError:
        return "no heartbeat: no worker ran with this ABFLOW_HOME"
    except ValueError:
        beat = {}
    if age > max_age_s:
        return f"no heartbeat in the last {max_age_s:.0f} s"
    waiting = beat.get("unassigned_s") or 0.0
    if waiting > unassigned_limit_s(settings):
        return (f"it has held no partition for {waiting:.0f} s: its consumer group may be stuck, or there are more "
                "workers than partitions")
    return None


def healthy(settings: Settings, max_age_s: float = 30.0) -> bool:
    """Whether a worker using this home read from Kafka within ``max_age_s`` and holds partitions."""
    return health(settings, max_age_s) is None


def unassigned_limit_s(settings: Settings) -> float:
    """How long a worker may hold no partition before it says so: a join takes about one session
    timeout, a rebalance two."""
    return max(UNASSIGNED_MIN_S, UNASSIGNED_SESSIONS * settings.kafka_session_timeout_seconds)


def event_topics(settings: Settings) -> dict[str, str]:
    """The topics the worker reads, with the kind of event each carries."""
    topics = settings.topics
    return {topics.invocations: INVOCATION, topics.conversions: CONVERSION, topics.shadows: SHADOW}


class BatchSource(threading.Thread):
    """Reads the event topics in batches (confluent-kafka) and hands each batch to ``deliver``."""

    def __init__(self, settings: Settings, deliver, metrics: WorkerMetrics | None = None):
        super().__init__(name="abflow-batch-source", daemon=True)
        self.settings = settings
        self.metrics = metrics
        self.deliver = deliver  # called from this thread; returns once the batch is queued
        self.kinds = event_topics(settings)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self._slots = threading.Semaphore(IN_FLIGHT_BATCHES)
        self._last_beat = 0.0
        self._assigned: set[str] = set()
        self._unassigned_since: float | None = time.monotonic()  # None while it holds partitions
        self._warned_at = 0.0
        self._done: collections.deque[dict[tuple[str, int], int]] = collections.deque()
        self.positions = ReadPositions()
        session_ms = int(settings.kafka_session_timeout_seconds * 1000)
        self.consumer = Consumer({
            "bootstrap.servers": settings.require_kafka_bootstrap(),
            "group.id": settings.consumer_group,
            # A unit's invocations and outcomes share a partition number (same key, same partition
            # count): the range assignor gives that number of every topic to one worker, so a unit's
            # rows have one writer. Cooperative-sticky (and round-robin) spread a group's partitions
            # without regard to topics: tried, two workers then wrote one unit's rows and deadlocked.
            # The price is an eager rebalance: every worker gives up its partitions for a moment.
            "partition.assignment.strategy": "range",
            "auto.offset.reset": "earliest",
            # Offsets are stored only for batches the sink committed, then committed periodically.
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": int(settings.kafka_commit_interval_seconds * 1000),
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 10),
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            # A partition's share of a fetch (librdkafka's default is 1 MB, thousands of events): smaller
            # shares mix the partitions within a batch, so the sink's lanes get work at the same time
            # (README, Benchmarks: the lanes).
            "max.partition.fetch.bytes": FETCH_BYTES_PER_PARTITION,
            "log.connection.close": False,
            # The consumer lag per partition, from librdkafka's own statistics: no extra broker call.
            **({"statistics.interval.ms": int(LAG_EVERY_S * 1000), "stats_cb": self._on_statistics}
               if metrics is not None else {}),
        })

    def run(self) -> None:
        try:
            self.consumer.subscribe(list(self.kinds), on_assign=self._on_assign, on_revoke=self._on_revoke)
            while not self.stopping.is_set():
                self._beat()
                self._store_done_offsets()
                messages = self.consumer.consume(self.settings.batch_max_events, self.settings.batch_max_seconds)
                records = self._without_holes(self._records(messages))
                if not records:
                    continue
                while not self._slots.acquire(timeout=0.2):
                    if self.stopping.is_set():
                        return
                self.deliver(records)
        except BaseException as exc:  # reported to the app, which stops the worker
            self.failure = exc
            log.exception("the Kafka consumer failed")
        finally:
            try:
                self._store_done_offsets()
                self.consumer.close()  # commits the stored offsets and leaves the group
            except (KafkaException, RuntimeError):
                pass

    def _beat(self, force: bool = False) -> None:
        """Write the heartbeat file that `abflow worker --healthcheck` (and `abflow up`) read, and say
        so loudly when the worker has held no partition for long."""
        now = time.monotonic()
        if force or now - self._last_beat >= HEARTBEAT_EVERY_S:
            self._last_beat = now
            waiting = 0.0 if self._unassigned_since is None else now - self._unassigned_since
            if self.metrics is not None:
                self.metrics.unassigned_seconds.set(waiting)
            if waiting > unassigned_limit_s(self.settings) and now - self._warned_at >= 60:
                self._warned_at = now
                log.warning("this worker has held no partition for %.0f s (group %s): its consumer group may be "
                            "stuck, or there are more workers than partitions", waiting, self.settings.consumer_group)
            path = heartbeat_path(self.settings)
            tmp = path.with_name(f"{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"pid": os.getpid(), "assigned": sorted(self._assigned),
                                       "unassigned_s": round(waiting, 1)}))
            tmp.replace(path)

    def _holding(self, any_partition: bool) -> None:
        if any_partition:
            self._unassigned_since = None
        elif self._unassigned_since is None:
            self._unassigned_since = time.monotonic()
        if self.metrics is not None:
            self.metrics.assigned.set(len(self._assigned))

    def _on_statistics(self, raw: str) -> None:
        """librdkafka's statistics (every LAG_EVERY_S, from the consumer's own calls): how far each
        held partition's end is from the offset stored for the last batch applied (not the last one
        committed to Kafka, which trails it by up to a commit interval)."""
        stats = json.loads(raw)
        self.metrics.lag.clear()  # partitions this worker no longer holds drop out
        for topic, found in stats.get("topics", {}).items():
            for partition, figures in found.get("partitions", {}).items():
                lag = figures.get("consumer_lag_stored", -1)
                if partition != "-1" and lag >= 0:
                    self.metrics.lag.labels(topic, partition).set(lag)

    def _records(self, messages) -> list[Record]:
        kinds = self.kinds
        records = []
        for m in messages:
            error = m.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error)
                continue
            topic = m.topic()
            records.append(Record(topic, m.partition(), m.offset(), kinds[topic], m.key(), m.value()))
        return records

    def _without_holes(self, records: list[Record]) -> list[Record]:
        """The records to deliver; a partition whose offsets jump ahead is read again from the hole
        (``stream_jobs.positions``). A seek that fails stops the worker: going on would skip the
        records held back."""
        checked = self.positions.check(records, self._log_start)
        for (topic, partition), (start, end) in checked.deleted.items():
            log.warning("%s[%d]: the broker's answer jumps from offset %d to %d, and its log now starts at %d: "
                        "retention deleted the records in between", topic, partition, start, end, end)
        for (topic, partition), (start, end) in checked.reread.items():
            log.warning("%s[%d]: the broker's answer jumps from offset %d to %d; reading again from %d",
                        topic, partition, start, end, start)
            if self.metrics is not None:
                self.metrics.offset_rereads.labels(topic).inc()
            self.consumer.seek(TopicPartition(topic, partition, start))
        for (topic, partition), offset in checked.filled.items():
            log.warning("%s[%d]: reading again found the records from offset %d that the broker had left out",
                        topic, partition, offset)
        for (topic, partition), (start, end) in checked.passed.items():
            log.warning("%s[%d]: offsets %d to %d are still missing after reading them again %d times: passed",
                        topic, partition, start, end - 1, self.positions.max_rereads)
        return checked.deliver

    def _log_start(self, tp: tuple[str, int]) -> int:
        """A partition's log start offset (a broker round trip, for a hole only); 0 when the broker
        does not say, so the hole is read again."""
        try:
            return self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=5, cached=False)[0]
        except KafkaException as exc:
            log.warning("%s[%d]: the broker did not give its log start offset (%s)", *tp, exc)
            return 0

    def done(self, records: list[Record]) -> None:
        """The batch is committed in PostgreSQL: the consumer may commit past it and read another.

        Called from the event loop; the offsets are stored by the consumer's own
        thread (a confluent-kafka consumer must not be called from two threads at once).
        """
        ends: dict[tuple[str, int], int] = {}
        for r in records:
            if r.offset >= ends.get((r.topic, r.partition), -1):
                ends[(r.topic, r.partition)] = r.offset + 1
        self._done.append(ends)
        self._slots.release()

    def _store_done_offsets(self) -> None:
        while self._done:
            ends = self._done.popleft()
            try:
                self.consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()])
            except KafkaException as exc:
                # Partitions revoked meanwhile: their new owner resumes from an older
                # commit, and the sink's stored offsets skip what was applied.
                log.info("offsets not stored (%s)", exc.args[0].str() if exc.args else exc)

    def _on_assign(self, consumer, partitions) -> None:
        self.positions.forget([(p.topic, p.partition) for p in partitions])
        self._assigned |= {f"{p.topic}[{p.partition}]" for p in partitions}
        self._holding(bool(self._assigned))
        self._beat(force=True)
        log.info("assigned partitions: %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "none")

    def _on_revoke(self, consumer, partitions) -> None:
        self.positions.forget([(p.topic, p.partition) for p in partitions])
        self._assigned -= {f"{p.topic}[{p.partition}]" for p in partitions}
        self._holding(bool(self._assigned))
        log.info("revoked partitions: %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "none")


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
