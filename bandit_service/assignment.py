"""Sticky assignment of units (users or sessions) to variants.

A unit's first assignment is drawn from the experiment's current weights by
salted hashing: the point ``hash(salt, experiment, unit)`` in [0, 1) picks a
variant on the cumulative weights, so every process given the same weights
assigns the same unit the same variant. The first assignment is stored with
its propensity (the weight of the chosen variant) and returned from then on,
also under concurrent requests (``INSERT … ON CONFLICT DO NOTHING``: one
writer wins, the others read its row) and across restarts.

Lifecycle rules:
- a *paused* experiment keeps its assigned units; new units get the champion, unstored;
- a *stopped* experiment gives everyone the champion;
- a unit whose stored variant was removed from the experiment is assigned again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg

DEFAULT_SALT = "abflow"


def hash_point(experiment_id: str, unit_id: str, salt: str = DEFAULT_SALT) -> float:
    """A uniform point in [0, 1), the same for the same inputs in every process."""
    digest = hashlib.blake2b(f"{salt}\x1f{experiment_id}\x1f{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose(weights: dict[str, float], point: float) -> str:
    """The variant whose slice of the cumulative weights holds ``point`` (weights in declared order)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    target = point * total
    running = 0.0
    chosen = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        chosen = name
        running += weight
        if target < running:
            return name
    return chosen  # rounding at the top end: the last variant with weight


@dataclass(frozen=True)
class Assignment:
    experiment_id: str
    unit_id: str
    variant: str
    propensity: float
    allocation_version: int | None
    new: bool  # first assignment of this unit (now stored)
    stored: bool = True  # False for a paused or stopped experiment's champion fallback


class ExperimentUnavailable(LookupError):
    pass


def current_weights(conn: psycopg.Connection, experiment_id: str) -> tuple[dict[str, float], int | None]:
    """The newest allocation weights, or the normalised initial weights before the first one."""
    rows = conn.execute(
        "SELECT v.name, v.initial_weight, a.weights, a.version FROM variants v LEFT JOIN LATERAL ("
        "SELECT weights, version FROM allocations WHERE experiment_id = v.experiment_id ORDER BY version DESC LIMIT 1"
        ") a ON true WHERE v.experiment_id = %s ORDER BY v.position", (experiment_id,)).fetchall()
    version = rows[0][3] if rows else None
    if version is not None:
        return {name: float(weights.get(name, 0.0)) for name, _, weights, _ in rows}, version
    total = sum(w for _, w, _, _ in rows)
    return {name: w / total for name, w, _, _ in rows}, None


def assign(conn: psycopg.Connection, experiment_id: str, unit_id: str, salt: str = DEFAULT_SALT) -> Assignment:
    """The unit's variant: its stored one, or a new one drawn from the current weights and stored.

    ``conn`` is in autocommit mode: each statement stands alone, and the insert is atomic.
    """
    if not conn.autocommit:
        raise ValueError("assign() needs an autocommit connection")
    # One round trip for what a returning unit needs: status, champion, its stored row.
    row = conn.execute(
        "SELECT e.status, (SELECT name FROM variants c WHERE c.experiment_id = e.experiment_id AND c.role = 'champion'), "
        "a.variant, a.propensity, a.allocation_version, v.name IS NOT NULL FROM experiments e "
        "LEFT JOIN assignments a ON a.experiment_id = e.experiment_id AND a.unit_id = %s "
        "LEFT JOIN variants v ON v.experiment_id = a.experiment_id AND v.name = a.variant "
        "WHERE e.experiment_id = %s", (unit_id, experiment_id)).fetchone()
    if row is None:
        raise ExperimentUnavailable(f"no experiment {experiment_id!r}")
    status, champion, stored_variant, stored_propensity, stored_version, variant_exists = row
    if status == "stopped":
        return Assignment(experiment_id, unit_id, champion, 1.0, None, new=False, stored=False)
    if stored_variant is not None and variant_exists:
        return Assignment(experiment_id, unit_id, stored_variant, stored_propensity, stored_version, new=False)
    if status == "paused":
        return Assignment(experiment_id, unit_id, champion, 1.0, None, new=False, stored=False)
    weights, version = current_weights(conn, experiment_id)
    variant = choose(weights, hash_point(experiment_id, unit_id, salt))
    propensity = weights[variant] / sum(weights.values())
    if stored_variant is not None:  # its variant was removed: assign again
        conn.execute("UPDATE assignments SET variant = %s, propensity = %s, allocation_version = %s, assigned_at = now() "
                     "WHERE experiment_id = %s AND unit_id = %s", (variant, propensity, version, experiment_id, unit_id))
        return Assignment(experiment_id, unit_id, variant, propensity, version, new=True)
    inserted = conn.execute(
        "INSERT INTO assignments (experiment_id, unit_id, variant, propensity, allocation_version) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING variant",
        (experiment_id, unit_id, variant, propensity, version)).fetchone()
    if inserted is not None:
        return Assignment(experiment_id, unit_id, variant, propensity, version, new=True)
    # A concurrent request stored the unit first: its answer stands.
    winner = conn.execute("SELECT variant, propensity, allocation_version FROM assignments "
                          "WHERE experiment_id = %s AND unit_id = %s", (experiment_id, unit_id)).fetchone()
    return Assignment(experiment_id, unit_id, winner[0], winner[1], winner[2], new=False)
