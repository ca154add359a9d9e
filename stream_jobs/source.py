"""Reading the event topics: a confluent-kafka consumer thread that hands the worker batches of
records, reads a partition again where the broker's answer skipped records (``positions``), stores
the offsets of the batches the sink committed, and writes the heartbeat the healthcheck reads."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from abflow.settings import Settings
from producers.contracts import CONVERSION, INVOCATION, SHADOW
from stream_jobs.metrics import WorkerMetrics
from stream_jobs.positions import ReadPositions
from stream_jobs.records import Record

log = logging.getLogger("abflow.worker")

IN_FLIGHT_BATCHES = 3  # one being applied, one being validated, one read ahead
HEARTBEAT_EVERY_S = 2.0
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
