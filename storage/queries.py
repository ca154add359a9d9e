"""Read queries operators and commands use."""

from __future__ import annotations

from sqlalchemy import Engine, text

# The sink notifies this channel, with the experiment id as payload, when it commits new aggregates.
AGGREGATES_CHANNEL = "abflow_aggregates"


def variant_totals(engine: Engine, experiment_id: str | None = None) -> list[dict]:
    query = (
        "SELECT experiment_id, variant, invocations, conversions, reward_sum, reward_sq_sum, errors,"
        " latency_count, latency_ms_sum, latency_hist FROM variant_totals"
    )
    params = {}
    if experiment_id is not None:
        query += " WHERE experiment_id = :experiment_id"
        params["experiment_id"] = experiment_id
    query += " ORDER BY experiment_id, variant"
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(query), params)]


def dead_letter_totals(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT topic, reason, count, last_seen_at FROM dead_letter_counts ORDER BY topic, reason")
        )
        return [dict(row._mapping) for row in rows]


def events_applied(engine: Engine) -> int:
    """Invocations plus conversions counted so far, over all experiments."""
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows")
        ).scalar_one()
    return int(value)


def allocation_history(engine: Engine, experiment_id: str, limit: int = 10) -> list[dict]:
    """The newest ``limit`` allocation versions of an experiment, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT version, strategy, phase, weights, statistics, computed_at FROM allocations "
            "WHERE experiment_id = :experiment_id ORDER BY version DESC LIMIT :limit"
        ), {"experiment_id": experiment_id, "limit": limit})
        return [dict(row._mapping) for row in rows]
