"""The PostgreSQL sink: one transaction per batch and lane holds the aggregates, the dedup ids and the offsets.

Exactly-once without Kafka transactions. Each batch's partitions are split into lanes (partition
number modulo ``settings.sink_connections``), applied at the same time, each in one transaction
on its own connection that:

1. locks the ``sink_offsets`` rows of its partitions (``SELECT … FOR UPDATE``),
   so two workers that both hold a partition during a rebalance serialise;
2. skips records below the stored next offset (already applied: a replay after
   a crash or a rebalance);
3. skips events whose ``event_id`` was counted in the same partition within the
   dedup horizon (ids are kept in ``dedup_batches``; each worker caches them and
   reloads a partition's ids whenever the stored offset is not the one it wrote
   last, i.e. someone else wrote in between);
4. exposes units and attributes their outcomes (``units``), stores the dedup ids
   and each partition's next offset;
5. last, the rows every partition shares: adds the partial sums into ``variant_windows`` (and
   shadow events into ``shadow_windows``; ``ON CONFLICT … DO UPDATE SET n = variant_windows.n +
   excluded.n``), the attributed totals and the counters, in key order. Another transaction that
   updates one of them waits from its update to our commit, so the later they come, the longer
   the lanes (and workers) run side by side.

Kafka's committed offsets only say where to resume reading; the stored offsets
decide what counts. A topic that was deleted and created again (a broker that lost its logs)
has a new topic id; the offsets stored for the old id are reset. Offsets a batch passes without
a record are split at the partition's log start offset: below it, retention deleted the records
before a worker counted them (counted as lost to retention); above it, the broker did not give
records it still keeps (a broker fault).

The parts: ``validate`` checks each record, ``classify`` sorts a batch (pure), ``checkpoint``
keeps offsets and dedup ids (``dedup``), ``units`` exposes units and attributes their events,
``windows`` sums per window, ``storage.sink`` and ``storage.units`` hold the SQL, ``dead_letters``
publishes what cannot be counted. This module runs them in order, in one transaction per lane.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg

from abflow.core.attribution import INVOCATION_KIND, OUTCOME_KIND, UnitEvent
from abflow.core.config import DEFAULT_ATTRIBUTION_WINDOW_SECONDS
from abflow.settings import Settings
from producers.contracts import INVOCATION, InvalidEvent
from producers.publisher import log_start_offsets
from storage import sink as store
from storage import units as unit_store
from storage.db import connect
from stream_jobs.checkpoint import Checkpoints, TopicIds
from stream_jobs.classify import classify, split_holes
from stream_jobs.dead_letters import DeadLetters
from stream_jobs.records import Record
from stream_jobs.units import apply_batch as apply_units
from stream_jobs.validate import Limits, validate
from stream_jobs.windows import aggregate, aggregate_shadows

log = logging.getLogger(__name__)

REGISTRY_MAX_AGE_SECONDS = 30.0
# Errors that PostgreSQL raises for what a batch holds (a value out of range, a constraint), not for
# an outage: retrying the same batch cannot help, so the sink looks for the records at fault.
REFUSED_FOR_DATA = (psycopg.errors.DataError, psycopg.errors.IntegrityError, psycopg.errors.ProgramLimitExceeded)
REFUSED_BY_DATABASE = "refused_by_database"


class BatchRefused(Exception):
    """PostgreSQL refuses a batch for a reason that is not in its records (a bug, not an outage)."""

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
    gaps: dict[str, int] = field(default_factory=dict)  # topic -> offsets the broker kept but did not give
    lost_to_retention: dict[str, int] = field(default_factory=dict)  # topic -> offsets deleted before counted

    def add(self, other: "BatchResult") -> None:
        self.counted += other.counted
        self.duplicates += other.duplicates
        self.replayed += other.replayed
        self.dead_letters += other.dead_letters
        for topic, figures in other.per_topic.items():
            self.per_topic[topic] = tuple(a + b for a, b in zip(self.per_topic.get(topic, (0, 0, 0)), figures))
        for key, n in other.dead_letter_reasons.items():
            self.dead_letter_reasons[key] = self.dead_letter_reasons.get(key, 0) + n
        for topic, n in other.gaps.items():
            self.gaps[topic] = self.gaps.get(topic, 0) + n
        for topic, n in other.lost_to_retention.items():
            self.lost_to_retention[topic] = self.lost_to_retention.get(topic, 0) + n


@dataclass
class Lane:
    """One connection of the sink and what it knows of its partitions: those whose number, modulo
    the number of lanes, is its index. A unit's invocations and outcomes have the same key, hence
    the same partition number in both topics, hence the same lane."""

    checkpoints: Checkpoints
    conn: psycopg.Connection | None = None


@dataclass
class Validated:
    """A batch and, per record, its event or why it is invalid."""

    records: list[Record]
    results: list


class PostgresSink:
    """Applies batches of records exactly once, one at a time (``apply`` is not thread-safe).
    ``validate`` may run on another thread meanwhile: the stream worker validates the next batch
    while this one's transaction runs.

    A batch's partitions are applied in ``settings.sink_connections`` lanes at once, each in its own
    transaction on its own connection: the lanes' PostgreSQL work runs on as many cores. The
    partitions are independent (each has its own stored offset and its own units), so a lane that
    fails leaves the others committed; applying the batch again skips what they applied."""

    def __init__(self, settings: Settings, dead_letters: DeadLetters, topic_ids: TopicIds):
        self.settings = settings
        self.dead_letters = dead_letters
        self.limits = Limits(
            max_event_bytes=settings.max_event_bytes,
            max_lateness_seconds=settings.max_lateness_seconds,
            max_future_seconds=settings.max_future_seconds,
        )
        self._lanes = [Lane(Checkpoints(topic_ids, float(settings.dedup_horizon_seconds)))
                       for _ in range(max(1, settings.sink_connections))]
        self._pool = ThreadPoolExecutor(len(self._lanes), "abflow-sink") if len(self._lanes) > 1 else None
        self._registry_conn: psycopg.Connection | None = None  # validate's own
        self._known: dict[str, frozenset[str]] = {}
        self._shadows: dict[str, frozenset[str]] = {}
        self._attribution: dict[str, float] = {}
        self._metric_windows: dict[str, tuple[int, ...]] = {}
        self._known_at = 0.0
        self._swept_at = 0.0

    # -- connection and registry -------------------------------------------------

    def _connection(self, lane: Lane) -> psycopg.Connection:
        if lane.conn is None or lane.conn.closed:
            lane.conn = connect(self.settings.libpq_url, autocommit=False, connect_timeout=5)
        return lane.conn

    def close(self) -> None:
        for conn in [lane.conn for lane in self._lanes] + [self._registry_conn]:
            if conn is not None:
                conn.close()
        for lane in self._lanes:
            lane.conn = None
        self._registry_conn = None
        if self._pool is not None:
            self._pool.shutdown()

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
        """Apply one validated batch, each lane's partitions in one transaction. On any error, the
        failed lanes applied nothing (the others committed); call again."""
        if not batch.records:
            return BatchResult()
        now = time.time()
        parts: dict[int, tuple[list[Record], list]] = {}
        for record, result in zip(batch.records, batch.results):
            records, results = parts.setdefault(record.partition % len(self._lanes), ([], []))
            records.append(record)
            results.append(result)
        # One sweep of the held outcomes at a time, by the first lane with records.
        sweeper = min(parts) if time.monotonic() - self._swept_at > HELD_SWEEP_SECONDS else None
        jobs = [(self._lanes[index], records, results, now, index == sweeper)
                for index, (records, results) in sorted(parts.items())]
        if self._pool is None or len(jobs) == 1:
            outcomes = [self._apply_lane(*job) for job in jobs]
        else:
            futures = [self._pool.submit(self._apply_lane, *job) for job in jobs]
            failures = [f.exception() for f in futures if f.exception() is not None]
            if failures:
                raise failures[0]
            outcomes = [f.result() for f in futures]
        if sweeper is not None:
            self._swept_at = time.monotonic()
        total = BatchResult()
        for outcome in outcomes:
            total.add(outcome)
        return total

    def _apply_lane(self, lane: Lane, records: list[Record], results: list, now: float, sweep: bool) -> BatchResult:
        try:
            return self._apply_once(lane, records, results, now, sweep)
        except REFUSED_FOR_DATA as exc:
            log.warning("PostgreSQL refused a batch of %d records (%s: %s); applying it in parts to find the records "
                        "at fault", len(records), type(exc).__name__, str(exc).strip()[:300])
            return self._isolate(lane, records, results, now, exc)

    def _isolate(self, lane: Lane, records: list[Record], results: list, now: float,
                 error: psycopg.Error) -> BatchResult:
        """Apply ``records``, which PostgreSQL refused with ``error``, in halves (each half in order,
        committed on its own) until the records at fault stand alone; each of those goes to the dead
        letters (reason ``refused_by_database``, the database's error as the detail) and the rest
        counts exactly once. A record at fault that cannot even be passed over means the fault is
        not in the records: ``BatchRefused``, which stops the worker rather than losing events."""
        candidates = [i for i, result in enumerate(results) if not isinstance(result, InvalidEvent)]
        if len(candidates) <= 1:
            if not candidates:
                raise BatchRefused(f"PostgreSQL refused a batch without a countable record: {error}") from error
            refused = list(results)
            detail = f"{type(error).__name__}: {str(error).strip()}"
            refused[candidates[0]] = InvalidEvent(REFUSED_BY_DATABASE, detail)
            record = records[candidates[0]]
            log.error("%s[%d] offset %d: PostgreSQL refuses the record; it goes to the dead letters (%s)",
                      record.topic, record.partition, record.offset, detail[:300])
            try:
                return self._apply_once(lane, records, refused, now, False)
            except REFUSED_FOR_DATA as again:
                raise BatchRefused(f"PostgreSQL refuses the batch even without the record at {record.topic}"
                                   f"[{record.partition}] offset {record.offset}: {again}") from again
        cut = candidates[len(candidates) // 2]
        total = BatchResult()
        for part, part_results in ((records[:cut], results[:cut]), (records[cut:], results[cut:])):
            try:
                total.add(self._apply_once(lane, part, part_results, now, False))
            except REFUSED_FOR_DATA as exc:
                total.add(self._isolate(lane, part, part_results, now, exc))
        return total

    def _apply_once(self, lane: Lane, records: list[Record], results: list, now: float, sweep: bool) -> BatchResult:
        try:
            return self._apply(lane, records, results, now, sweep)
        except BaseException as exc:
            if not isinstance(exc, REFUSED_FOR_DATA):
                # Whether it committed is unknown (a connection lost during the commit): read the
                # partitions' offsets and ids again. A refusal rolled back for sure, and the cache only
                # learns at a commit, so it stays true (and a batch applied in parts does not reload
                # the partitions' dedup ids at each try).
                lane.checkpoints.forget()
            if lane.conn is not None and not lane.conn.closed:
                try:
                    lane.conn.rollback()
                except psycopg.Error:
                    lane.conn.close()
            raise

    def _unit_events(self, events: list) -> list[UnitEvent]:
        """The counted invocations and conversions, as ``units`` attributes them."""
        unit_events = []
        for e in events:
            window = self._attribution.get(e.experiment_id, DEFAULT_ATTRIBUTION_WINDOW_SECONDS)
            invocation = e.kind == INVOCATION
            unit_events.append(UnitEvent(
                INVOCATION_KIND if invocation else OUTCOME_KIND, e.experiment_id, e.user_id, e.variant, e.timestamp,
                e.propensity if invocation else None, 0.0 if invocation else e.reward, invocation and e.error, window,
                e.values))
        return unit_events

    def _apply(self, lane: Lane, records: list[Record], results: list, now: float, sweep: bool) -> BatchResult:
        conn = self._connection(lane)
        checkpoints = lane.checkpoints
        lowest: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            lowest[tp] = min(lowest.get(tp, record.offset), record.offset)
        # (1) Lock the partitions' stored offsets.
        next_offsets, topic_ids = checkpoints.begin(conn, lowest, now)
        event_ids: dict[tuple[str, int], list[str]] = {}
        for record, result in zip(records, results):
            if not isinstance(result, InvalidEvent):
                event_ids.setdefault((record.topic, record.partition), []).append(result.event_id)
        # (2) and (3): records below the stored offsets are replayed, ids counted within the horizon duplicates.
        batch = classify(records, results, next_offsets, checkpoints.seen_among(event_ids))
        gaps: dict[str, int] = {}
        lost: dict[str, int] = {}
        if batch.holes:
            # Each partition's log start offset, asked of the broker only for a batch with a hole.
            log_starts = log_start_offsets(self.settings.require_kafka_bootstrap(), sorted(batch.holes))
            deleted, missing = split_holes(batch.holes, log_starts)
            for (topic, partition), n in deleted.items():
                lost[topic] = lost.get(topic, 0) + n
                log.error("%d records of %s[%d] (before offset %d) were deleted by the topic's retention before a "
                          "worker counted them: the counts lack those events (workers stopped or behind for longer "
                          "than the retention)", n, topic, partition, batch.next_offsets[(topic, partition)])
            for (topic, partition), n in missing.items():
                gaps[topic] = gaps.get(topic, 0) + n
                log.warning("%d offsets of %s[%d] were passed without a record read (in a batch that ends at %d): the "
                            "broker lost or withheld records it still keeps", n, topic, partition,
                            batch.next_offsets[(topic, partition)])

        # (4) First the rows of this lane's partitions and units, then (5, just before the commit) the rows
        # every partition shares: another lane or worker waits for those from its update to our commit.
        # Read in the batch's transaction: a stage that began before it is the one its events join.
        stages = store.rollout_stages(conn)
        attributed = apply_units(conn, self._unit_events(batch.counted), now, self.settings.exposure_wait_seconds,
                                 sweep, self._metric_windows, stages)
        counts: dict[tuple[str, str], int] = {}
        for record, error in batch.rejected:
            counts[(record.topic, error.reason)] = counts.get((record.topic, error.reason), 0) + 1
        checkpoints.write(conn, batch.next_offsets, topic_ids, batch.new_ids, now)

        # (5) The rows every partition shares, in key order.
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
        unit_store.add_attributed(conn, attributed)
        store.add_dead_letter_counts(conn, counts)
        store.add_stream_counters(conn, {t: (n[0], n[1], n[2]) for t, n in batch.per_topic.items()})
        # After every statement, so that a batch PostgreSQL refuses (and applies again in parts) does not
        # publish its dead letters again each time; before the commit, so that none is lost.
        if batch.rejected:
            self.dead_letters.publish(batch.rejected)
        conn.commit()
        checkpoints.committed(batch.next_offsets, batch.new_ids, now)
        return BatchResult(counted=len(batch.counted) + len(batch.shadows), duplicates=batch.duplicates,
                           replayed=batch.replayed, dead_letters=len(batch.rejected),
                           per_topic={t: (n[0], n[1], n[2]) for t, n in batch.per_topic.items()},
                           dead_letter_reasons=counts,
                           gaps=gaps, lost_to_retention=lost)
