"""The stream sink's SQL: window upserts, dead-letter and stream counters, partition offsets and
dedup ids. psycopg: one connection per worker, one transaction per batch (see ``stream_jobs.sink``),
``executemany`` pipelines the upserts.
"""

from __future__ import annotations

import psycopg

from storage.queries import AGGREGATES_CHANNEL

TopicPartition = tuple[str, int]

_UPSERT_WINDOW = """
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

_UPSERT_SHADOW_WINDOW = """
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

_UPSERT_DEAD_LETTERS = """
INSERT INTO dead_letter_counts AS d (topic, reason, count, last_seen_at) VALUES (%s, %s, %s, now())
ON CONFLICT (topic, reason) DO UPDATE SET count = d.count + excluded.count, last_seen_at = now()
"""


_UPSERT_COUNTERS = """
INSERT INTO stream_counters AS c (topic, counted, duplicates, dead_letters, updated_at) VALUES (%s, %s, %s, %s, now())
ON CONFLICT (topic) DO UPDATE SET counted = c.counted + excluded.counted,
    duplicates = c.duplicates + excluded.duplicates, dead_letters = c.dead_letters + excluded.dead_letters,
    updated_at = now()
"""


def _many(conn: psycopg.Connection, sql: str, rows: list[tuple]) -> None:
    with conn.cursor() as cur:
        cur.executemany(sql, rows)


def registry(conn: psycopg.Connection) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]],
                                               dict[str, tuple[float | None, tuple[int, ...]]]]:
    """What the sink needs of every experiment: its variants, its declared shadows, and its attribution
    windows in seconds: the experiment's (None: the config's default) and its metrics' own."""
    known: dict[str, set[str]] = {}
    for experiment_id, name in conn.execute("SELECT experiment_id, name FROM variants"):
        known.setdefault(experiment_id, set()).add(name)
    shadows = {experiment_id: frozenset(s["name"] for s in declared) for experiment_id, declared in conn.execute(
        "SELECT experiment_id, config->'shadows' FROM experiments WHERE jsonb_typeof(config->'shadows') = 'array'")}
    windows = {experiment_id: (window, tuple(sorted({int(m["attribution_window_seconds"]) for m in metrics or ()
                                                     if m.get("attribution_window_seconds") is not None})))
               for experiment_id, window, metrics in conn.execute(
        "SELECT experiment_id, (config->>'attribution_window_seconds')::float8, config->'metrics' FROM experiments")}
    return {k: frozenset(v) for k, v in known.items()}, shadows, windows


def rollout_stages(conn: psycopg.Connection) -> dict[str, float]:
    """The start (epoch seconds) of each running or paused rollout's current stage."""
    return {experiment_id: float(start) for experiment_id, start in conn.execute(
        "SELECT experiment_id, extract(epoch FROM stage_started_at) FROM rollouts WHERE state IN ('running', 'paused')")}


def lock_offsets(conn: psycopg.Connection, partitions: list[TopicPartition], topic_ids: dict[str, str]
                 ) -> dict[TopicPartition, tuple[str, int]]:
    """Lock the partitions' offset rows (created at 0 when new); (topic id, next offset) of each."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO sink_offsets (topic, partition, topic_id, next_offset) VALUES (%s, %s, %s, 0) "
            "ON CONFLICT DO NOTHING",
            [(t, p, topic_ids[t]) for t, p in partitions],
        )
        cur.execute(
            "SELECT topic, partition, topic_id, next_offset FROM sink_offsets "
            "WHERE (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[])) "
            "ORDER BY topic, partition FOR UPDATE",
            ([t for t, _ in partitions], [p for _, p in partitions]),
        )
        return {(t, p): (topic_id, next_offset) for t, p, topic_id, next_offset in cur}


def store_offsets(conn: psycopg.Connection, offsets: dict[TopicPartition, int], topic_ids: dict[str, str]) -> None:
    _many(conn, "UPDATE sink_offsets SET next_offset = %s, topic_id = %s, updated_at = now() "
          "WHERE topic = %s AND partition = %s",
          [(offset, topic_ids[t], t, p) for (t, p), offset in sorted(offsets.items())])


def add_windows(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """Add partial sums into ``variant_windows`` and wake the refresher for their experiments (on commit).
    Row: (experiment, variant, window start epoch, window seconds, invocations, conversions, reward sum,
    reward square sum, errors, latency count, latency ms sum, latency histogram)."""
    if not rows:
        return
    _many(conn, _UPSERT_WINDOW, rows)
    _many(conn, "SELECT pg_notify(%s, %s)", [(AGGREGATES_CHANNEL, e) for e in sorted({row[0] for row in rows})])


def add_shadow_windows(conn: psycopg.Connection, rows: list[tuple]) -> None:
    if rows:
        _many(conn, _UPSERT_SHADOW_WINDOW, rows)


def add_dead_letter_counts(conn: psycopg.Connection, counts: dict[tuple[str, str], int]) -> None:
    """Per (topic, reason)."""
    if counts:
        _many(conn, _UPSERT_DEAD_LETTERS, [(t, r, n) for (t, r), n in sorted(counts.items())])


def add_stream_counters(conn: psycopg.Connection, per_topic: dict[str, tuple[int, int, int]]) -> None:
    """Per topic: (counted, duplicates, dead letters)."""
    rows = [(t, *n) for t, n in sorted(per_topic.items()) if any(n)]
    if rows:
        _many(conn, _UPSERT_COUNTERS, rows)


def add_dedup_ids(conn: psycopg.Connection, at: float, ids: dict[TopicPartition, list[str]]) -> None:
    rows = [(t, p, at, "\n".join(batch)) for (t, p), batch in ids.items() if batch]
    if rows:
        _many(conn, "INSERT INTO dedup_batches (topic, partition, created_at, event_ids) "
              "VALUES (%s, %s, to_timestamp(%s), %s)", rows)


def dedup_ids_since(conn: psycopg.Connection, tp: TopicPartition, since: float) -> list[tuple[float, list[str]]]:
    """The partition's counted ids since ``since`` (epoch seconds), by batch: (batch time, ids)."""
    rows = conn.execute(
        "SELECT extract(epoch FROM created_at), event_ids FROM dedup_batches "
        "WHERE topic = %s AND partition = %s AND created_at >= to_timestamp(%s) ORDER BY id",
        (tp[0], tp[1], since))
    return [(float(created_at), event_ids.split("\n")) for created_at, event_ids in rows]


def prune_dedup_ids(conn: psycopg.Connection, partitions: list[TopicPartition], before: float) -> None:
    """Delete the partitions' ids counted before ``before``. Only the partitions whose offsets the
    transaction holds: two workers (or lanes) never delete the same rows at once."""
    _many(conn, "DELETE FROM dedup_batches WHERE topic = %s AND partition = %s AND created_at < to_timestamp(%s)",
          [(t, p, before) for t, p in sorted(partitions)])
