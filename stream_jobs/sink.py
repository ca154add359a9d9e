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
   counts dead letters, and stores each partition's next offset.

Kafka's committed offsets only say where to resume reading; the stored offsets
decide what counts. A topic that was deleted and created again (a broker that
lost its logs) has a new topic id; the offsets stored for the old id are reset.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import psycopg

from abflow.settings import Settings
from producers.contracts import SHADOW, InvalidEvent
from storage.queries import AGGREGATES_CHANNEL
from stream_jobs.aggregate import Limits, Record, aggregate, aggregate_shadows, validate

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

UPSERT_WINDOW = """
INSERT INTO variant_windows AS w (
    experiment_id, variant, window_start, window_seconds, invocations, conversions, reward_sum,
    reward_sq_sum, errors, latency_count, latency_ms_sum, latency_hist, updated_at)
VALUES (%s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (experiment_id, variant, window_start) DO UPDATE SET
    invocations = w.invocations + excluded.invocations,
    conversions = w.conversions + excluded.conversions,
    reward_sum = w.reward_sum + excluded.reward_sum,
    reward_sq_sum = w.reward_sq_sum + excluded.reward_sq_sum,
    errors = w.errors + excluded.errors,
    latency_count = w.latency_count + excluded.latency_count,
    latency_ms_sum = w.latency_ms_sum + excluded.latency_ms_sum,
    latency_hist = abflow_add_counts(w.latency_hist, excluded.latency_hist),
    updated_at = now()
"""

UPSERT_SHADOW_WINDOW = """
INSERT INTO shadow_windows AS w (
    experiment_id, variant, served_variant, window_start, window_seconds, requests, compared, agreements, errors,
    served_errors, both_errors, latency_count, latency_ms_sum, latency_hist, served_latency_count, served_latency_ms_sum,
    served_latency_hist, updated_at)
VALUES (%s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (experiment_id, variant, served_variant, window_start) DO UPDATE SET
    requests = w.requests + excluded.requests,
    compared = w.compared + excluded.compared,
    agreements = w.agreements + excluded.agreements,
    errors = w.errors + excluded.errors,
    served_errors = w.served_errors + excluded.served_errors,
    both_errors = w.both_errors + excluded.both_errors,
    latency_count = w.latency_count + excluded.latency_count,
    latency_ms_sum = w.latency_ms_sum + excluded.latency_ms_sum,
    latency_hist = abflow_add_counts(w.latency_hist, excluded.latency_hist),
    served_latency_count = w.served_latency_count + excluded.served_latency_count,
    served_latency_ms_sum = w.served_latency_ms_sum + excluded.served_latency_ms_sum,
    served_latency_hist = abflow_add_counts(w.served_latency_hist, excluded.served_latency_hist),
    updated_at = now()
"""

UPSERT_DEAD_LETTERS = """
INSERT INTO dead_letter_counts AS d (topic, reason, count, last_seen_at) VALUES (%s, %s, %s, now())
ON CONFLICT (topic, reason) DO UPDATE SET count = d.count + excluded.count, last_seen_at = now()
"""


UPSERT_COUNTERS = """
INSERT INTO stream_counters AS c (topic, counted, duplicates, dead_letters, updated_at) VALUES (%s, %s, %s, %s, now())
ON CONFLICT (topic) DO UPDATE SET counted = c.counted + excluded.counted,
    duplicates = c.duplicates + excluded.duplicates, dead_letters = c.dead_letters + excluded.dead_letters,
    updated_at = now()
"""


@dataclass
class BatchResult:
    counted: int = 0
    duplicates: int = 0
    replayed: int = 0  # records at or below an offset already applied
    dead_letters: int = 0


class PartitionDedup:
    """The event ids one partition counted within the dedup horizon."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._batches: deque[tuple[float, list[str]]] = deque()

    def add(self, at: float, event_ids: list[str]) -> None:
        if event_ids:
            self._batches.append((at, event_ids))
            self.seen.update(event_ids)

    def expire(self, older_than: float) -> None:
        while self._batches and self._batches[0][0] < older_than:
            _, ids = self._batches.popleft()
            self.seen.difference_update(ids)


class TopicIds:
    """Topic ids from the broker, cached; ``fresh=True`` asks again."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self._ids: dict[str, str] = {}

    def get(self, topics: set[str], fresh: bool = False) -> dict[str, str]:
        missing = [t for t in topics if fresh or t not in self._ids]
        if missing:
            from producers.publisher import topic_ids

            self._ids.update(topic_ids(self.bootstrap, missing))
        return {t: self._ids[t] for t in topics}


class PostgresSink:
    """Applies batches of records exactly once. Not thread-safe: one batch at a time."""

    def __init__(self, settings: Settings, dead_letters, topic_ids: TopicIds):
        self.settings = settings
        self.dead_letters = dead_letters  # a producers.publisher.Publisher
        self.topic_ids = topic_ids
        self.limits = Limits(
            max_event_bytes=settings.max_event_bytes,
            max_lateness_seconds=settings.max_lateness_seconds,
            max_future_seconds=settings.max_future_seconds,
        )
        self.horizon = float(settings.dedup_horizon_seconds)
        self._conn: psycopg.Connection | None = None
        self._known: dict[str, frozenset[str]] = {}
        self._shadows: dict[str, frozenset[str]] = {}
        self._known_at = 0.0
        self._expected_next: dict[TopicPartition, int] = {}
        self._dedup: dict[TopicPartition, PartitionDedup] = {}
        self._pruned_at = 0.0

    # -- connection and registry -------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.libpq_url, connect_timeout=5)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _load_registry(self) -> None:
        conn = self._connection()
        known: dict[str, set[str]] = {}
        for experiment_id, name in conn.execute("SELECT experiment_id, name FROM variants"):
            known.setdefault(experiment_id, set()).add(name)
        shadows = {experiment_id: frozenset(s["name"] for s in declared) for experiment_id, declared in conn.execute(
            "SELECT experiment_id, config->'shadows' FROM experiments WHERE jsonb_typeof(config->'shadows') = 'array'")}
        conn.rollback()
        self._known = {k: frozenset(v) for k, v in known.items()}
        self._shadows = shadows
        self._known_at = time.monotonic()

    def _validate_all(self, records: list[Record], now: float):
        if time.monotonic() - self._known_at > 30:
            self._load_registry()
        results = []
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
        """Apply one batch in one transaction. On any error nothing is applied; call again."""
        if not records:
            return BatchResult()
        now = time.time()
        results = self._validate_all(records, now)
        try:
            return self._apply(records, results, now)
        except BaseException:
            # The transaction rolled back: forget what we believed about the partitions.
            self._expected_next.clear()
            if self._conn is not None and not self._conn.closed:
                try:
                    self._conn.rollback()
                except psycopg.Error:
                    self.close()
            raise

    def _lock_offsets(self, conn, partitions: list[TopicPartition], ids: dict[str, str]) -> dict[TopicPartition, tuple[str, int]]:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO sink_offsets (topic, partition, topic_id, next_offset) VALUES (%s, %s, %s, 0) "
                "ON CONFLICT DO NOTHING",
                [(t, p, ids[t]) for t, p in partitions],
            )
            cur.execute(
                "SELECT topic, partition, topic_id, next_offset FROM sink_offsets "
                "WHERE (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[])) "
                "ORDER BY topic, partition FOR UPDATE",
                ([t for t, _ in partitions], [p for _, p in partitions]),
            )
            return {(t, p): (topic_id, next_offset) for t, p, topic_id, next_offset in cur}

    def _apply(self, records: list[Record], results: list, now: float) -> BatchResult:
        conn = self._connection()
        partitions = sorted({(r.topic, r.partition) for r in records})
        topics = {t for t, _ in partitions}
        ids = self.topic_ids.get(topics)
        stored = self._lock_offsets(conn, partitions, ids)
        lowest = {}
        for record in records:
            tp = (record.topic, record.partition)
            lowest[tp] = min(lowest.get(tp, record.offset), record.offset)
        if any(lowest[tp] < stored[tp][1] or stored[tp][0] != ids[tp[0]] for tp in partitions):
            # About to skip records as already applied, or the topic looks recreated:
            # make sure the topic id is current before trusting the stored offsets.
            ids = self.topic_ids.get(topics, fresh=True)
        next_offset: dict[TopicPartition, int] = {}
        for tp in partitions:
            topic_id, offset = stored[tp]
            if topic_id != ids[tp[0]]:
                log.warning("topic %s was recreated (id %s -> %s): offsets of partition %d start again at 0",
                            tp[0], topic_id, ids[tp[0]], tp[1])
                offset = 0
            next_offset[tp] = offset
            if self._expected_next.get(tp) != offset or tp not in self._dedup:
                self._reload_dedup(conn, tp, now)

        result = BatchResult()
        per_topic = {t: [0, 0, 0] for t in topics}  # counted, duplicates, dead letters
        counted, shadows = [], []  # invocations and conversions; shadow events (their own table)
        new_ids: dict[TopicPartition, list[str]] = {tp: [] for tp in partitions}
        batch_seen: dict[TopicPartition, set[str]] = {tp: set() for tp in partitions}
        rejected: list[tuple[Record, InvalidEvent]] = []
        applied_to: dict[TopicPartition, int] = dict(next_offset)
        for record, outcome in zip(records, results):
            tp = (record.topic, record.partition)
            if record.offset < next_offset[tp]:
                result.replayed += 1
                continue
            applied_to[tp] = max(applied_to[tp], record.offset + 1)
            if isinstance(outcome, InvalidEvent):
                rejected.append((record, outcome))
                per_topic[record.topic][2] += 1
                continue
            event_id = outcome.event_id
            if event_id in self._dedup[tp].seen or event_id in batch_seen[tp]:
                result.duplicates += 1
                per_topic[record.topic][1] += 1
                continue
            batch_seen[tp].add(event_id)
            new_ids[tp].append(event_id)
            (shadows if outcome.kind == SHADOW else counted).append(outcome)
            per_topic[record.topic][0] += 1
        result.counted = len(counted) + len(shadows)
        result.dead_letters = len(rejected)

        with conn.cursor() as cur:
            window_seconds = self.settings.window_seconds
            if shadows:
                cur.executemany(UPSERT_SHADOW_WINDOW, [
                    (experiment_id, variant, served, start, window_seconds, t.requests, t.compared, t.agreements,
                     t.errors, t.served_errors, t.both_errors, t.latency.count, t.latency.ms_sum, t.latency.hist,
                     t.served_latency.count, t.served_latency.ms_sum, t.served_latency.hist)
                    for (experiment_id, variant, served, start), t in sorted(aggregate_shadows(shadows,
                                                                                               window_seconds).items())
                ])
            rows = [
                (experiment_id, variant, start, window_seconds, t.invocations, t.conversions, t.reward_sum,
                 t.reward_sq_sum, t.errors, t.latency.count, t.latency.ms_sum, t.latency.hist)
                for (experiment_id, variant, start), t in sorted(aggregate(counted, window_seconds).items())
            ]
            if rows:
                cur.executemany(UPSERT_WINDOW, rows)
                # Delivered on commit: the weight refresher reacts without polling.
                cur.executemany("SELECT pg_notify(%s, %s)",
                                [(AGGREGATES_CHANNEL, e) for e in sorted({row[0] for row in rows})])
            dedup_rows = [(t, p, now, "\n".join(batch)) for (t, p), batch in new_ids.items() if batch]
            if dedup_rows:
                cur.executemany(
                    "INSERT INTO dedup_batches (topic, partition, created_at, event_ids) "
                    "VALUES (%s, %s, to_timestamp(%s), %s)",
                    dedup_rows,
                )
            if rejected:
                self._publish_dead_letters(rejected)
                counts: dict[tuple[str, str], int] = {}
                for record, error in rejected:
                    counts[(record.topic, error.reason)] = counts.get((record.topic, error.reason), 0) + 1
                cur.executemany(UPSERT_DEAD_LETTERS, [(t, r, n) for (t, r), n in sorted(counts.items())])
            cur.executemany(UPSERT_COUNTERS, [(t, *n) for t, n in sorted(per_topic.items()) if any(n)])
            cur.executemany(
                "UPDATE sink_offsets SET next_offset = %s, topic_id = %s, updated_at = now() "
                "WHERE topic = %s AND partition = %s",
                [(applied_to[tp], ids[tp[0]], tp[0], tp[1]) for tp in partitions],
            )
            if now - self._pruned_at > 60:
                cur.execute(
                    "DELETE FROM dedup_batches WHERE created_at < to_timestamp(%s)", (now - self.horizon - 60,)
                )
        conn.commit()
        if now - self._pruned_at > 60:
            self._pruned_at = now

        # Committed: now the cache may believe it.
        for tp in partitions:
            self._expected_next[tp] = applied_to[tp]
            dedup = self._dedup[tp]
            dedup.add(now, new_ids[tp])
            dedup.expire(now - self.horizon)
        return result

    def _reload_dedup(self, conn, tp: TopicPartition, now: float) -> None:
        dedup = PartitionDedup()
        rows = conn.execute(
            "SELECT extract(epoch FROM created_at), event_ids FROM dedup_batches "
            "WHERE topic = %s AND partition = %s AND created_at >= to_timestamp(%s) ORDER BY id",
            (tp[0], tp[1], now - self.horizon),
        )
        for created_at, event_ids in rows:
            dedup.add(float(created_at), event_ids.split("\n"))
        self._dedup[tp] = dedup

    def _publish_dead_letters(self, rejected: list[tuple[Record, InvalidEvent]]) -> None:
        topic = self.settings.topics.dead_letters
        for record, error in rejected:
            headers = [
                ("abflow.reason", error.reason.encode()),
                ("abflow.detail", error.detail.encode("utf-8", "replace")),
                ("abflow.source.topic", record.topic.encode()),
                ("abflow.source.partition", str(record.partition).encode()),
                ("abflow.source.offset", str(record.offset).encode()),
            ]
            self.dead_letters.produce(topic, value=record.value, key=record.key, headers=headers)
        # Delivered before the offsets move past them: a crash replays them (at least once).
        self.dead_letters.flush(30)
