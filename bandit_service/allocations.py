"""Every change of an experiment's weights, by the bandit or by a rollout, is a new version in the
``allocations`` history and a record on the compacted allocations topic (key: experiment id)."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import psycopg

from producers.publisher import Publisher
from storage.allocations import insert_next_allocation, serving_context

SAME_WEIGHTS_TOLERANCE = 1e-9


def allocation_record(experiment_id: str, version: int, strategy: str, phase: str, weights: dict[str, float],
                      computed_at: datetime, champion: str | None = None, layer: tuple[str, int, int] | None = None,
                      shadows: list[str] | None = None, sticky: bool = True, status: str = "running") -> bytes:
    """The value published on the allocations topic (key: experiment id); ``shadows`` are the shadow
    variants the experiment declares, which the SDK may call beside the served one; ``sticky`` false
    (a rollout's weights) tells serving to place every unit by its hash, not where it first put it;
    ``status`` paused or stopped tells it to put no new unit in the experiment (stopped: no unit)."""
    record = {"experiment_id": experiment_id, "version": version, "strategy": strategy, "phase": phase,
              "weights": weights, "computed_at": computed_at.isoformat(), "shadows": list(shadows or ()),
              "sticky": sticky, "status": status}
    if champion is not None:
        record["champion"] = champion
    if layer is not None:
        record["layer"] = {"name": layer[0], "buckets": [layer[1], layer[2]]}
    return orjson.dumps(record)


def publish_allocation(conn: psycopg.Connection, publisher: Publisher, topic: str, experiment_id: str,
                       strategy: str, phase: str, weights: dict[str, float], statistics: dict, sticky: bool = True
                       ) -> int:
    """Store the next allocation version and publish it; returns the version.

    The record is published and flushed inside the transaction that inserts the row, so the
    history never holds a version the topic did not get; a crash between the two can repeat a
    version on the topic, never skip one.
    """
    with conn.transaction():
        computed_at = datetime.now(timezone.utc)
        version = insert_next_allocation(conn, experiment_id, strategy, phase, weights, statistics, computed_at, sticky)
        champion, layer, shadows, status = serving_context(conn, experiment_id)
        publisher.produce(topic, allocation_record(experiment_id, version, strategy, phase, weights, computed_at,
                                                   champion, layer, shadows, sticky, status), key=experiment_id)
        publisher.flush(10)
    return version


def same_weights(old: dict, new: dict[str, float]) -> bool:
    return old.keys() == new.keys() and all(abs(old[k] - new[k]) <= SAME_WEIGHTS_TOLERANCE for k in new)
