"""Stored first assignments of units. Asynchronous psycopg on autocommit connections from the API's
pool: this is the hot path of `POST /assign`, one round trip for a returning unit and two for a new
one, with no thread per request and the commits of concurrent new units overlapping."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

# Variants in declared order with their initial weights, and the newest allocation if any.
_WEIGHTS_SQL = (
    "(SELECT json_agg(json_build_array(name, initial_weight) ORDER BY position) FROM variants "
    " WHERE experiment_id = e.experiment_id), a.weights, a.version"
)
_LATEST_ALLOCATION = (
    "LEFT JOIN LATERAL (SELECT weights, version, sticky FROM allocations WHERE experiment_id = e.experiment_id "
    "ORDER BY version DESC LIMIT 1) a ON true"
)
_ASSIGN_CONTEXT = (
    "SELECT e.status, (SELECT name FROM variants c WHERE c.experiment_id = e.experiment_id AND c.role = 'champion'), "
    "e.winner, e.layer, e.layer_start, e.layer_end, s.variant, s.propensity, s.allocation_version, "
    "v.name IS NOT NULL, " + _WEIGHTS_SQL + ", coalesce(a.sticky, true) FROM experiments e "
    "LEFT JOIN assignments s ON s.experiment_id = e.experiment_id AND s.unit_id = %s "
    "LEFT JOIN variants v ON v.experiment_id = s.experiment_id AND v.name = s.variant "
    + _LATEST_ALLOCATION + " WHERE e.experiment_id = %s"
)


@dataclass(frozen=True)
class AssignContext:
    """Everything ``assign`` decides on, read in one statement."""

    status: str
    champion: str
    winner: str | None
    layer: str
    layer_start: int
    layer_end: int
    stored_variant: str | None  # the unit's stored assignment, if any
    stored_propensity: float | None
    stored_version: int | None
    stored_variant_exists: bool  # False when the stored variant was removed from the experiment
    variants: list  # [[name, initial_weight], ...] in declared order
    latest_weights: dict | None  # the newest allocation's weights, None before the first
    version: int | None
    sticky: bool  # False for a rollout's weights: every unit is placed by its hash


async def assign_context(conn: psycopg.AsyncConnection, experiment_id: str, unit_id: str) -> AssignContext | None:
    row = await (await conn.execute(_ASSIGN_CONTEXT, (unit_id, experiment_id))).fetchone()
    return None if row is None else AssignContext(*row)


def weights_context(conn: psycopg.Connection, experiment_id: str) -> tuple[list, dict | None, int | None] | None:
    """(variants with initial weights, newest allocation's weights, its version), or None without the experiment."""
    return conn.execute("SELECT " + _WEIGHTS_SQL + " FROM experiments e " + _LATEST_ALLOCATION
                        + " WHERE e.experiment_id = %s", (experiment_id,)).fetchone()


async def insert_assignment(conn: psycopg.AsyncConnection, experiment_id: str, unit_id: str, variant: str,
                            propensity: float, version: int | None) -> bool:
    """Store the unit's first assignment; False when a concurrent request stored one first."""
    inserted = await conn.execute(
        "INSERT INTO assignments (experiment_id, unit_id, variant, propensity, allocation_version) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING variant",
        (experiment_id, unit_id, variant, propensity, version))
    return await inserted.fetchone() is not None


async def replace_assignment(conn: psycopg.AsyncConnection, experiment_id: str, unit_id: str, variant: str,
                             propensity: float, version: int | None) -> None:
    await conn.execute("UPDATE assignments SET variant = %s, propensity = %s, allocation_version = %s, "
                       "assigned_at = now() WHERE experiment_id = %s AND unit_id = %s",
                       (variant, propensity, version, experiment_id, unit_id))


async def stored_assignment(conn: psycopg.AsyncConnection, experiment_id: str, unit_id: str
                            ) -> tuple[str, float, int | None]:
    """(variant, propensity, allocation version) of the unit's stored assignment."""
    found = await conn.execute("SELECT variant, propensity, allocation_version FROM assignments "
                               "WHERE experiment_id = %s AND unit_id = %s", (experiment_id, unit_id))
    row = await found.fetchone()
    assert row is not None  # only asked after a conflict: the row exists
    return row
