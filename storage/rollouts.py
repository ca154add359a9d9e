"""A rollout's durable state and its transitions. psycopg: the controller runs each check in one
transaction on the refresher leader's session, with the rollout's row locked."""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from storage.queries import bucket_sums

_STATE_COLUMNS = "state, stage, stage_started_at, deadline_at, failed_checks"
TRANSITION_COLUMNS = ("id", "at", "actor", "action", "from_state", "to_state", "from_stage", "to_stage", "reason",
                      "figures", "notification")


def lock_state(conn: psycopg.Connection, experiment_id: str) -> tuple | None:
    """(state, stage, stage_started_at, deadline_at, failed_checks, last_check_at), row-locked; None before the start."""
    return conn.execute(f"SELECT {_STATE_COLUMNS}, last_check_at FROM rollouts WHERE experiment_id = %s FOR UPDATE",
                        (experiment_id,)).fetchone()


def insert_state(conn: psycopg.Connection, experiment_id: str, state: str, stage: int, stage_started_at: datetime,
                 deadline_at: datetime) -> bool:
    """Store a rollout's first state; False when another process stored it first."""
    return conn.execute(
        f"INSERT INTO rollouts (experiment_id, {_STATE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING 1",
        (experiment_id, state, stage, stage_started_at, deadline_at, 0)).fetchone() is not None


def save_state(conn: psycopg.Connection, experiment_id: str, state: str, stage: int, stage_started_at: datetime,
               deadline_at: datetime, failed_checks: int, checked_at: datetime | None = None,
               figures: dict | None = None) -> None:
    conn.execute(
        "UPDATE rollouts SET state = %s, stage = %s, stage_started_at = %s, deadline_at = %s, failed_checks = %s, "
        "last_check_at = coalesce(%s, last_check_at), last_check = coalesce(%s, last_check), updated_at = now() "
        "WHERE experiment_id = %s",
        (state, stage, stage_started_at, deadline_at, failed_checks, checked_at,
         None if figures is None else Jsonb(figures), experiment_id))


def state_and_stage(conn: psycopg.Connection, experiment_id: str) -> tuple[str, int]:
    return conn.execute("SELECT state, stage FROM rollouts WHERE experiment_id = %s", (experiment_id,)).fetchone()


def status_row(conn: psycopg.Connection, experiment_id: str) -> tuple | None:
    """(state, stage, stage_started_at, deadline_at, failed_checks, last_check_at, last_check), None before the start."""
    return conn.execute(f"SELECT {_STATE_COLUMNS}, last_check_at, last_check FROM rollouts WHERE experiment_id = %s",
                        (experiment_id,)).fetchone()


def insert_transition(conn: psycopg.Connection, experiment_id: str, actor: str, action: str, from_state: str | None,
                      to_state: str, from_stage: int | None, to_stage: int, reason: str, figures: dict,
                      notified_at: datetime | None, notification: str | None) -> None:
    conn.execute(
        "INSERT INTO rollout_transitions (experiment_id, actor, action, from_state, to_state, from_stage, to_stage, "
        "reason, figures, notified_at, notification) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (experiment_id, actor, action, from_state, to_state, from_stage, to_stage, reason, Jsonb(figures),
         notified_at, notification))


def last_action(conn: psycopg.Connection, experiment_id: str) -> str | None:
    row = conn.execute("SELECT action FROM rollout_transitions WHERE experiment_id = %s ORDER BY id DESC LIMIT 1",
                       (experiment_id,)).fetchone()
    return None if row is None else row[0]


def transitions(conn: psycopg.Connection, experiment_id: str, limit: int) -> list[dict]:
    """The newest ``limit`` transitions, oldest first."""
    rows = conn.execute(
        "SELECT " + ", ".join(TRANSITION_COLUMNS) + " FROM rollout_transitions WHERE experiment_id = %s "
        "ORDER BY id DESC LIMIT %s", (experiment_id, limit)).fetchall()
    return [dict(zip(TRANSITION_COLUMNS, values)) for values in reversed(rows)]


def unsent_transitions(conn: psycopg.Connection, experiment_id: str) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT id, at, actor, action, from_state, to_state, from_stage, to_stage, reason, figures "
            "FROM rollout_transitions WHERE experiment_id = %s AND notified_at IS NULL ORDER BY id",
            (experiment_id,)).fetchall()


def mark_sent(conn: psycopg.Connection, transition_id: int, outcome: str) -> None:
    conn.execute("UPDATE rollout_transitions SET notified_at = now(), notification = %s WHERE id = %s",
                 (outcome, transition_id))


def stage_histograms(conn: psycopg.Connection, experiment_id: str, since: datetime, buckets: int
                     ) -> dict[str, list[int]]:
    """Latency histograms (``buckets`` counts) per variant of the windows that overlap [since, now)."""
    rows = conn.execute(
        f"SELECT variant, {bucket_sums(buckets)} FROM variant_windows WHERE experiment_id = %s "
        "AND window_start + make_interval(secs => window_seconds) > %s GROUP BY variant",
        (experiment_id, since)).fetchall()
    return {row[0]: [int(c) for c in row[1:]] for row in rows}

