"""The allocations history (every version of every experiment's weights) and what the weight
refresher reads to compute the next one. psycopg: these run on the refresher's own session."""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

# What a serving process needs beside the weights: the variant to serve units outside the
# experiment's share of its layer (and everyone once it stopped), that share, and the status.
_SERVING_CONTEXT = (
    "SELECT coalesce(e.winner, (SELECT name FROM variants v WHERE v.experiment_id = e.experiment_id "
    "AND v.role = 'champion')), e.layer, e.layer_start, e.layer_end, e.status, "
    "coalesce((SELECT array_agg(s ->> 'name' ORDER BY s ->> 'name') FROM jsonb_array_elements(CASE "
    "WHEN jsonb_typeof(e.config -> 'shadows') = 'array' THEN e.config -> 'shadows' ELSE '[]' END) s), '{}') "
    "FROM experiments e WHERE e.experiment_id = %s"
)


def serving_context(conn: psycopg.Connection, experiment_id: str
                    ) -> tuple[str | None, tuple[str, int, int] | None, list[str], str]:
    """(champion or winner, (layer, start, end), declared shadows, status) of the experiment."""
    row = conn.execute(_SERVING_CONTEXT, (experiment_id,)).fetchone()
    return (None, None, [], "running") if row is None else (row[0], (row[1], row[2], row[3]), list(row[5]), row[4])


def insert_next_allocation(conn: psycopg.Connection, experiment_id: str, strategy: str, phase: str,
                           weights: dict[str, float], statistics: dict, computed_at: datetime, sticky: bool = True
                           ) -> int:
    """Store the experiment's next version; returns it. Run it inside the caller's transaction."""
    latest = conn.execute("SELECT max(version) FROM allocations WHERE experiment_id = %s",
                          (experiment_id,)).fetchone()[0]
    version = 1 if latest is None else latest + 1
    conn.execute(
        "INSERT INTO allocations (experiment_id, version, strategy, phase, weights, statistics, computed_at, sticky) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (experiment_id, version, strategy, phase, Jsonb(weights), Jsonb(statistics), computed_at, sticky))
    return version


def latest_allocation(conn: psycopg.Connection, experiment_id: str) -> tuple[int, str, dict, bool] | None:
    """(version, phase, weights, sticky) of the newest allocation, or None."""
    return conn.execute("SELECT version, phase, weights, sticky FROM allocations WHERE experiment_id = %s "
                        "ORDER BY version DESC LIMIT 1", (experiment_id,)).fetchone()


def latest_of_every_experiment(conn: psycopg.Connection) -> list[tuple]:
    """The newest version of each experiment, stopped ones too (serving must learn that they stopped):
    (experiment_id, version, strategy, phase, weights, computed_at, sticky)."""
    return conn.execute(
        "SELECT DISTINCT ON (experiment_id) experiment_id, version, strategy, phase, weights, computed_at, sticky "
        "FROM allocations ORDER BY experiment_id, version DESC").fetchall()


def running_experiments(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT experiment_id FROM experiments WHERE status = 'running'")]


def policy_settings(conn: psycopg.Connection, experiment_id: str) -> tuple | None:
    """(strategy, epsilon, warmup, min_weight, reward_model, status, config) of the experiment, or None."""
    return conn.execute(
        "SELECT strategy, epsilon, warmup, min_weight, reward_model, status, config FROM experiments "
        "WHERE experiment_id = %s", (experiment_id,)).fetchone()


def arm_totals(conn: psycopg.Connection, experiment_id: str) -> list[tuple[str, float, int, float, float]]:
    """Per variant in declared order: (name, initial weight, invocations, reward sum, reward square sum),
    of the events attributed to the units exposed to it (``storage.units``): a reward that arrives
    late still counts for the variant its unit was exposed to."""
    rows = conn.execute(
        "SELECT v.name, v.initial_weight, coalesce(t.invocations, 0), coalesce(t.reward_sum, 0), "
        "coalesce(t.reward_sq_sum, 0) FROM variants v LEFT JOIN attributed_totals t "
        "ON t.experiment_id = v.experiment_id AND t.variant = v.name "
        "WHERE v.experiment_id = %s ORDER BY v.position", (experiment_id,)).fetchall()
    return [(name, weight, int(n), float(r), float(r2)) for name, weight, n, r, r2 in rows]


def try_leader_lock(conn: psycopg.Connection, key: int) -> bool:
    """Take the session-level advisory lock ``key`` if it is free; it is held until the session ends."""
    return conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
