"""Sticky assignment of units (users or sessions) to variants.

A unit's first assignment is drawn from the experiment's current weights by
salted hashing: the point ``hash(salt, experiment, unit)`` in [0, 1) picks a
variant on the cumulative weights, so every process given the same weights
assigns the same unit the same variant. The first assignment is stored with
its propensity (the weight of the chosen variant) and returned from then on,
also under concurrent requests (``INSERT … ON CONFLICT DO NOTHING``: one
writer wins, the others read its row) and across restarts.

Layers: experiments that must not share users sit in one *layer*. The point
``hash(salt, "layer", layer, unit)`` puts every unit in one of ``LAYER_BUCKETS``
buckets; each experiment of the layer holds its own range of buckets, and a unit
outside an experiment's range is not in it (it gets the champion, not stored,
``in_experiment`` false). The variant point is salted with the experiment, so
which variant a unit gets is independent of its bucket and of every other layer.
An experiment without a layer is alone in a layer named after it.

Lifecycle rules:
- a *paused* experiment keeps its assigned units; new units get the champion, unstored;
- a *stopped* experiment gives everyone the champion, or the winner once one was promoted;
- a unit whose stored variant was removed from the experiment, or whose weight is now zero (a
  rollout rolled back, or finished), is assigned again.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from abflow.core.errors import ExperimentNotFound
from abflow.core.buckets import DEFAULT_SALT, choose, hash_point, layer_bucket

@dataclass(frozen=True)
class Assignment:
    experiment_id: str
    unit_id: str
    variant: str
    propensity: float
    allocation_version: int | None
    new: bool  # first assignment of this unit (now stored)
    stored: bool = True  # False for a paused or stopped experiment's champion fallback
    in_experiment: bool = True  # False outside the experiment's share of its layer: log no events for it


# Variants in declared order with their initial weights, and the newest allocation if any.
_WEIGHTS_SQL = (
    "(SELECT json_agg(json_build_array(name, initial_weight) ORDER BY position) FROM variants "
    " WHERE experiment_id = e.experiment_id), a.weights, a.version"
)
_LATEST_ALLOCATION = (
    "LEFT JOIN LATERAL (SELECT weights, version FROM allocations WHERE experiment_id = e.experiment_id "
    "ORDER BY version DESC LIMIT 1) a ON true"
)
ASSIGN_CONTEXT = (
    "SELECT e.status, (SELECT name FROM variants c WHERE c.experiment_id = e.experiment_id AND c.role = 'champion'), "
    "e.winner, e.layer, e.layer_start, e.layer_end, s.variant, s.propensity, s.allocation_version, v.name IS NOT NULL, " + _WEIGHTS_SQL + " FROM experiments e "
    "LEFT JOIN assignments s ON s.experiment_id = e.experiment_id AND s.unit_id = %s "
    "LEFT JOIN variants v ON v.experiment_id = s.experiment_id AND v.name = s.variant "
    + _LATEST_ALLOCATION + " WHERE e.experiment_id = %s"
)


def _weights_of(variants: list, latest: dict | None) -> dict[str, float]:
    if latest is not None:
        return {name: float(latest.get(name, 0.0)) for name, _ in variants}
    total = sum(w for _, w in variants)
    return {name: w / total for name, w in variants}


def current_weights(conn: psycopg.Connection, experiment_id: str) -> tuple[dict[str, float], int | None]:
    """The newest allocation weights, or the normalised initial weights before the first one."""
    row = conn.execute("SELECT " + _WEIGHTS_SQL + " FROM experiments e " + _LATEST_ALLOCATION
                       + " WHERE e.experiment_id = %s", (experiment_id,)).fetchone()
    if row is None:
        raise ExperimentNotFound(experiment_id)
    variants, latest, version = row
    return _weights_of(variants, latest), version


def assign(conn: psycopg.Connection, experiment_id: str, unit_id: str, salt: str = DEFAULT_SALT) -> Assignment:
    """The unit's variant: its stored one, or a new one drawn from the current weights and stored.

    ``conn`` is in autocommit mode: each statement stands alone, and the insert is atomic.
    """
    if not conn.autocommit:
        raise ValueError("assign() needs an autocommit connection")
    # One round trip for everything but the insert: status, champion, the unit's stored row,
    # and the current weights (the newest allocation, or the initial weights).
    row = conn.execute(ASSIGN_CONTEXT, (unit_id, experiment_id)).fetchone()
    if row is None:
        raise ExperimentNotFound(experiment_id)
    (status, champion, winner, layer, layer_start, layer_end, stored_variant, stored_propensity, stored_version,
     variant_exists, variants, latest_weights, version) = row
    if status == "stopped":
        return Assignment(experiment_id, unit_id, winner or champion, 1.0, None, new=False, stored=False)
    if not layer_start <= layer_bucket(layer, unit_id, salt) < layer_end:
        return Assignment(experiment_id, unit_id, champion, 1.0, None, new=False, stored=False, in_experiment=False)
    weights = _weights_of(variants, latest_weights)
    if stored_variant is not None and variant_exists and weights.get(stored_variant, 0.0) > 0:
        return Assignment(experiment_id, unit_id, stored_variant, stored_propensity, stored_version, new=False)
    if status == "paused":
        return Assignment(experiment_id, unit_id, champion, 1.0, None, new=False, stored=False)
    variant = choose(weights, hash_point(experiment_id, unit_id, salt))
    propensity = weights[variant] / sum(weights.values())
    if stored_variant is not None:  # its variant was removed or no longer gets traffic: assign again
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
