"""The PostgreSQL sink: one transaction per batch holds the aggregates, the dedup ids and the offsets.

Exactly-once without Kafka transactions. Each batch, in one transaction:

1. locks the ``sink_offsets`` rows of its partitions (``SELECT … FOR UPDATE``),
   so two workers that both hold a partition during a rebalance serialise;
2. skips records below the stored next offset (already applied: a replay after
   a crash or a rebalance);
3. skips events whose ``event_id`` was counted in the same partition within the
   dedup horizon (ids are kept in ``dedup_batches``; each worker caches them and
   reloads a partition's ids whenever the stored offset is not the one it wrote
   last, i.e. someone else wrote in between);
4. adds the partial sums into ``variant_windows`` (and shadow events into ``shadow_windows``)
   (``ON CONFLICT … DO UPDATE SET n = variant_windows.n + excluded.n``),
5. exposes units and attributes their outcomes (``storage.units``),
6. counts dead letters, and stores each partition's next offset.

Kafka's committed offsets only say where to resume reading; the stored offsets
decide what counts. A topic that was deleted and created again (a broker that
lost its logs) has a new topic id; the offsets stored for the old id are reset.

The parts: ``classify`` sorts a batch (pure), ``checkpoint`` keeps offsets and
dedup ids, ``storage.sink`` holds the SQL, ``dead_letters`` publishes what
cannot be counted. This module runs them in order, in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson
import psycopg

from abflow.core.config import DEFAULT_ATTRIBUTION_WINDOW_SECONDS
from abflow.settings import Settings
from producers.contracts import INVOCATION, InvalidEvent
from storage import sink as store
from storage import units as unit_store
from storage.db import connect
from stream_jobs.aggregate import Limits, Record, aggregate, aggregate_shadows, validate
from stream_jobs.checkpoint import Checkpoints, TopicIds
from stream_jobs.classify import classify
from stream_jobs.dead_letters import DeadLetters

log = logging.getLogger(__name__)

REGISTRY_MAX_AGE_SECONDS = 30.0
# How often a batch also looks at every held outcome: attributes those whose unit is exposed now,
# gives up those that waited their time.
HELD_SWEEP_SECONDS = 5.0


@dataclass
class BatchResult:
    counted: int = 0
    duplicates: int = 0
    replayed: int = 0  # records at or below an offset already applied
    dead_letters: int = 0
    per_topic: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # counted, duplicates, dead letters
    dead_letter_reasons: dict[tuple[str, str], int] = field(default_factory=dict)  # (topic, reason) -> count


@dataclass
class Validated:
    """A batch and, per record, its event or why it is invalid."""

    records: list[Record]
    results: list


class PostgresSink:
    """Applies batches of records exactly once, one at a time (``apply`` is not thread-safe).
    ``validate`` may run on another thread meanwhile: the stream worker validates the next batch
    while this one's transaction runs."""

    def __init__(self, settings: Settings, dead_letters: DeadLetters, topic_ids: TopicIds):
        self.settings = settings
        self.dead_letters = dead_letters
        self.limits = Limits(
            max_event_bytes=settings.max_event_bytes,
            max_lateness_seconds=settings.max_lateness_seconds,
            max_future_seconds=settings.max_future_seconds,
        )
        self.checkpoints = Checkpoints(topic_ids, float(settings.dedup_horizon_seconds))
        self._conn: psycopg.Connection | None = None
        self._registry_conn: psycopg.Connection | None = None  # validate's own
        self._known: dict[str, frozenset[str]] = {}
        self._shadows: dict[str, frozenset[str]] = {}
        self._attribution: dict[str, float] = {}
        self._metric_windows: dict[str, tuple[int, ...]] = {}
        self._known_at = 0.0
        self._swept_at = 0.0

    # -- connection and registry -------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings.libpq_url, autocommit=False, connect_timeout=5)
        return self._conn

    def close(self) -> None:
        for conn in (self._conn, self._registry_conn):
            if conn is not None:
                conn.close()
        self._conn = self._registry_conn = None

    def _load_registry(self) -> None:
        if self._registry_conn is None or self._registry_conn.closed:
            self._registry_conn = connect(self.settings.libpq_url, autocommit=False, connect_timeout=5)
        try:
            # One snapshot; each dict is replaced whole: a batch being applied meanwhile reads one version or the other.
            self._known, self._shadows, windows = store.registry(self._registry_conn)
            self._registry_conn.rollback()
        except psycopg.Error:
            self._registry_conn.close()  # a fresh one next time, not one stuck in a failed transaction
            raise
        self._attribution = {experiment_id: window or DEFAULT_ATTRIBUTION_WINDOW_SECONDS
                             for experiment_id, (window, _) in windows.items()}
        self._metric_windows = {experiment_id: metric_windows for experiment_id, (_, metric_windows) in windows.items()
                                if metric_windows}
        self._known_at = time.monotonic()

    def _validate_all(self, records: list[Record], now: float) -> list:
        if time.monotonic() - self._known_at > REGISTRY_MAX_AGE_SECONDS:
            self._load_registry()
        results: list = []
        unknown = []
        for index, record in enumerate(records):
            try:
                results.append(validate(record, self._known, now, self.limits, self._shadows))
            except InvalidEvent as exc:
                results.append(exc)
                if exc.reason in ("unknown_experiment", "unknown_variant"):
                    unknown.append(index)
        if unknown:
            # An experiment created since the last load: look again before rejecting.
            self._load_registry()
            for index in unknown:
                try:
                    results[index] = validate(records[index], self._known, now, self.limits, self._shadows)
                except InvalidEvent as exc:
                    results[index] = exc
        return results

    # -- the batch ---------------------------------------------------------------

    def process(self, records: list[Record]) -> BatchResult:
        """Validate and apply one batch in one transaction. On any error nothing is applied; call again."""
        return self.apply(self.validate(records))

    def validate(self, records: list[Record]) -> Validated:
        """Each record's event, or why it is invalid (what the registry knows now). No transaction."""
        return Validated(records, self._validate_all(records, time.time()) if records else [])

    def apply(self, batch: Validated) -> BatchResult:
        """Apply one validated batch in one transaction. On any error nothing is applied; call again."""
        if not batch.records:
            return BatchResult()
        try:
            return self._apply(batch.records, batch.results, time.time())
        except BaseException:
            self.checkpoints.forget()
            if self._conn is not None and not self._conn.closed:
                try:
                    self._conn.rollback()
                except psycopg.Error:
                    self.close()
            raise

    def _unit_rows(self, events: list) -> list[tuple]:
        """The counted invocations and conversions as ``storage.units`` rows."""
        rows = []
        for e in events:
            window = self._attribution.get(e.experiment_id, DEFAULT_ATTRIBUTION_WINDOW_SECONDS)
            values = None if e.values is None else orjson.dumps(e.values).decode()
            if e.kind == INVOCATION:
                rows.append((unit_store.INVOCATION_KIND, e.experiment_id, e.user_id, e.variant, e.timestamp,
                             e.propensity, 0.0, e.error, window, values))
            else:
                rows.append((unit_store.OUTCOME_KIND, e.experiment_id, e.user_id, e.variant, e.timestamp, None,
                             e.reward, False, window, values))
        return rows

    def _apply(self, records: list[Record], results: list, now: float) -> BatchResult:
        conn = self._connection()
        lowest: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            lowest[tp] = min(lowest.get(tp, record.offset), record.offset)
        next_offsets, topic_ids = self.checkpoints.begin(conn, lowest, now)
        event_ids: dict[tuple[str, int], list[str]] = {}
        for record, result in zip(records, results):
            if not isinstance(result, InvalidEvent):
                event_ids.setdefault((record.topic, record.partition), []).append(result.event_id)
        batch = classify(records, results, next_offsets, self.checkpoints.seen_among(event_ids))

        window_seconds = self.settings.window_seconds
        store.add_shadow_windows(conn, [
            (experiment_id, variant, served, start, window_seconds, t.requests, t.compared, t.agreements,
             t.errors, t.served_errors, t.both_errors, t.latency.count, t.latency.ms_sum, t.latency.hist,
             t.served_latency.count, t.served_latency.ms_sum, t.served_latency.hist)
            for (experiment_id, variant, served, start), t in sorted(aggregate_shadows(batch.shadows,
                                                                                       window_seconds).items())])
        store.add_windows(conn, [
            (experiment_id, variant, start, window_seconds, t.invocations, t.conversions, t.reward_sum,
             t.reward_sq_sum, t.errors, t.latency.count, t.latency.ms_sum, t.latency.hist)
            for (experiment_id, variant, start), t in sorted(aggregate(batch.counted, window_seconds).items())])
        sweep = time.monotonic() - self._swept_at > HELD_SWEEP_SECONDS
        # Read in the batch's transaction: a stage that began before it is the one its events join.
        stages = store.rollout_stages(conn)
        unit_store.apply_batch(conn, self._unit_rows(batch.counted), now, self.settings.exposure_wait_seconds, sweep,
                               self._metric_windows, stages)
        counts: dict[tuple[str, str], int] = {}
        if batch.rejected:
            self.dead_letters.publish(batch.rejected)
            for record, error in batch.rejected:
                counts[(record.topic, error.reason)] = counts.get((record.topic, error.reason), 0) + 1
            store.add_dead_letter_counts(conn, counts)
        store.add_stream_counters(conn, {t: (n[0], n[1], n[2]) for t, n in batch.per_topic.items()})
        self.checkpoints.write(conn, batch.next_offsets, topic_ids, batch.new_ids, now)
        conn.commit()
        self.checkpoints.committed(batch.next_offsets, batch.new_ids, now)
        if sweep:
            self._swept_at = time.monotonic()
        return BatchResult(counted=len(batch.counted) + len(batch.shadows), duplicates=batch.duplicates,
                           replayed=batch.replayed, dead_letters=len(batch.rejected),
                           per_topic={t: (n[0], n[1], n[2]) for t, n in batch.per_topic.items()},
                           dead_letter_reasons=counts)
