"""The allocations history and its topic: every change of an experiment's weights, by the bandit
or by a rollout, is a new version in ``allocations`` and a record on the compacted topic."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import psycopg
from psycopg.types.json import Jsonb

from producers.publisher import Publisher

SAME_WEIGHTS_TOLERANCE = 1e-9


# What a serving process needs beside the weights: the variant to serve units outside the
# experiment's share of its layer, and that share (see bandit_service.assignment).
SERVING_CONTEXT = (
    "SELECT coalesce(e.winner, (SELECT name FROM variants v WHERE v.experiment_id = e.experiment_id "
    "AND v.role = 'champion')), e.layer, e.layer_start, e.layer_end FROM experiments e WHERE e.experiment_id = %s"
)


def allocation_record(experiment_id: str, version: int, strategy: str, phase: str, weights: dict[str, float],
                      computed_at: datetime, champion: str | None = None, layer: tuple[str, int, int] | None = None
                      ) -> bytes:
    """The value published on the allocations topic (key: experiment id)."""
    record = {"experiment_id": experiment_id, "version": version, "strategy": strategy, "phase": phase,
              "weights": weights, "computed_at": computed_at.isoformat()}
    if champion is not None:
        record["champion"] = champion
    if layer is not None:
        record["layer"] = {"name": layer[0], "buckets": [layer[1], layer[2]]}
    return orjson.dumps(record)


def serving_context(conn: psycopg.Connection, experiment_id: str) -> tuple[str | None, tuple[str, int, int] | None]:
    """(champion, (layer, start, end)) of the experiment, for ``allocation_record``."""
    row = conn.execute(SERVING_CONTEXT, (experiment_id,)).fetchone()
    return (None, None) if row is None else (row[0], (row[1], row[2], row[3]))


def publish_allocation(conn: psycopg.Connection, publisher: Publisher, topic: str, experiment_id: str,
                       strategy: str, phase: str, weights: dict[str, float], statistics: dict) -> int:
    """Store the next allocation version and publish it, inside one transaction (see above); returns it."""
    with conn.transaction():
        latest = conn.execute("SELECT max(version) FROM allocations WHERE experiment_id = %s",
                              (experiment_id,)).fetchone()[0]
        version = 1 if latest is None else latest + 1
        computed_at = datetime.now(timezone.utc)
        champion, layer = serving_context(conn, experiment_id)
        conn.execute(
            "INSERT INTO allocations (experiment_id, version, strategy, phase, weights, statistics, computed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (experiment_id, version, strategy, phase, Jsonb(weights), Jsonb(statistics), computed_at))
        publisher.produce(topic, allocation_record(experiment_id, version, strategy, phase, weights, computed_at,
                                                   champion, layer), key=experiment_id)
        publisher.flush(10)
    return version


def latest_allocation(conn: psycopg.Connection, experiment_id: str) -> tuple[int, str, dict] | None:
    """(version, phase, weights) of the newest allocation, or None."""
    return conn.execute("SELECT version, phase, weights FROM allocations WHERE experiment_id = %s "
                        "ORDER BY version DESC LIMIT 1", (experiment_id,)).fetchone()


def same_weights(old: dict, new: dict[str, float]) -> bool:
    return old.keys() == new.keys() and all(abs(old[k] - new[k]) <= SAME_WEIGHTS_TOLERANCE for k in new)

