"""Sticky assignment of units (users or sessions) to variants.

A unit's first assignment is drawn from the experiment's current weights by
salted hashing (``abflow.core.buckets``): every process given the same weights
assigns the same unit the same variant. The first assignment is stored with
its propensity (the weight of the chosen variant) and returned from then on,
also under concurrent requests (``INSERT … ON CONFLICT DO NOTHING``: one
writer wins, the others read its row) and across restarts.

Layers: experiments that must not share users sit in one *layer*; each holds
its own range of the layer's buckets, and a unit outside an experiment's range
is not in it (it gets the champion, not stored, ``in_experiment`` false). An
experiment without a layer is alone in a layer named after it.

Lifecycle rules:
- a *paused* experiment keeps its assigned units; new units get the champion, unstored and outside
  the experiment (``in_experiment`` false: they are not randomized, so they log nothing for it);
- a *stopped* experiment gives everyone the champion, or the winner once one was promoted, outside
  the experiment: its share of the layer may belong to another experiment by now;
- a unit whose stored variant was removed from the experiment, or whose weight is now zero (a
  rollout rolled back, or finished), is assigned again;
- during a rollout (weights that are not *sticky*) every unit, stored or not, is placed by its hash
  on the stage's weights, and its stored assignment follows: a stage's share is the share of all
  units, and since the challenger's slice only grows, a unit on it stays on it until a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from abflow.core.buckets import DEFAULT_SALT, choose, hash_point, layer_bucket
from abflow.core.errors import ExperimentNotFound
from storage import assignments as store


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


def _weights_of(variants: list, latest: dict | None) -> dict[str, float]:
    if latest is not None:
        return {name: float(latest.get(name, 0.0)) for name, _ in variants}
    total = sum(w for _, w in variants)
    return {name: w / total for name, w in variants}


def current_weights(conn: psycopg.Connection, experiment_id: str) -> tuple[dict[str, float], int | None]:
    """The newest allocation weights, or the normalised initial weights before the first one."""
    found = store.weights_context(conn, experiment_id)
    if found is None:
        raise ExperimentNotFound(experiment_id)
    variants, latest, version = found
    return _weights_of(variants, latest), version


async def assign(conn: psycopg.AsyncConnection, experiment_id: str, unit_id: str, salt: str = DEFAULT_SALT
                 ) -> Assignment:
    """The unit's variant: its stored one, or a new one drawn from the current weights and stored.

    ``conn`` is in autocommit mode: each statement stands alone, and the insert is atomic.
    """
    if not conn.autocommit:
        raise ValueError("assign() needs an autocommit connection")
    # One round trip for everything but the insert.
    c = await store.assign_context(conn, experiment_id, unit_id)
    if c is None:
        raise ExperimentNotFound(experiment_id)
    if c.status == "stopped":
        return Assignment(experiment_id, unit_id, c.winner or c.champion, 1.0, None, new=False, stored=False,
                          in_experiment=False)
    if not c.layer_start <= layer_bucket(c.layer, unit_id, salt) < c.layer_end:
        return Assignment(experiment_id, unit_id, c.champion, 1.0, None, new=False, stored=False, in_experiment=False)
    weights = _weights_of(c.variants, c.latest_weights)
    by_hash = choose(weights, hash_point(experiment_id, unit_id, salt))
    keep = c.stored_variant == by_hash if not c.sticky and c.status == "running" else \
        c.stored_variant_exists and weights.get(c.stored_variant or "", 0.0) > 0
    if c.stored_variant is not None and keep:
        return Assignment(experiment_id, unit_id, c.stored_variant, c.stored_propensity, c.stored_version, new=False)
    if c.status == "paused":
        return Assignment(experiment_id, unit_id, c.champion, 1.0, None, new=False, stored=False, in_experiment=False)
    variant = by_hash
    propensity = weights[variant] / sum(weights.values())
    if c.stored_variant is not None:  # its variant was removed, gets no traffic now, or the rollout moved it
        await store.replace_assignment(conn, experiment_id, unit_id, variant, propensity, c.version)
        return Assignment(experiment_id, unit_id, variant, propensity, c.version, new=True)
    if await store.insert_assignment(conn, experiment_id, unit_id, variant, propensity, c.version):
        return Assignment(experiment_id, unit_id, variant, propensity, c.version, new=True)
    # A concurrent request stored the unit first: its answer stands.
    won, won_propensity, won_version = await store.stored_assignment(conn, experiment_id, unit_id)
    return Assignment(experiment_id, unit_id, won, won_propensity, won_version, new=False)
