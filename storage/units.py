"""Units, exposures and attributed outcomes in PostgreSQL (the statements only: ``stream_jobs.units``
runs them for a batch, in the sink's transaction); and the units' moments the report reads.

The unit is what was randomized: the user (or the session), the events' ``user_id``. What an
exposure is and how events count for it is ``abflow.core.attribution``'s (pure); this module keeps
it in PostgreSQL:

- ``unit_state``: per (experiment, unit), the exposure (variant, time, propensity) and the sums of
  the events attributed to it (``value_sums`` beside the stream's own: the named values, and the
  windowed sums of metrics with a shorter attribution window).
- ``held_outcomes``: conversions travel on their own topic and may be counted before the unit's
  first invocation. They wait here and are attributed when the exposure arrives, or given up
  (``no_exposure``) once they have waited ``hold_seconds``.
- ``stage_units``: a rollout places every unit by its hash, so a returning unit may be served
  another variant at a later stage than the one it was exposed to. For each running rollout the
  events of the current stage are also summed per unit, under the variant the stage served it:
  what the stage is judged on.

Exactly once comes from the sink: these statements run in the batch's transaction, with the
offsets and the dedup ids, on the events the batch counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from abflow.core.attribution import OUTCOME_KIND, Attributed, Exposure, UnitEvent, UnitKey, UnitSums
from abflow.core.config import UNIT_VARIABLES, VALUE_NAME, WINDOWED_NAME

# A per-unit variable the report reads: a linear combination of the unit's sums ((name, coefficient)
# pairs: a column of UNIT_VARIABLES, or a key of value_sums: a value's name or a windowed name),
# optionally turned into an indicator (> 0) or capped at a value.
Variable = tuple[tuple[tuple[str, float], ...], bool, float | None]

# Units are looked up by key, one index probe each (LIMIT 1 / OFFSET 0 keep the planner from turning
# the lookups into joins that scan the tables): a batch costs what its units cost, not what the units
# of every experiment ever run do (README, Benchmarks: lookups by key).
_STORED = """
SELECT k.experiment_id, k.unit_id, s.variant, s.exposed_at, s.propensity
FROM ROWS FROM (string_to_table(%s, E'\n'), string_to_table(%s, E'\n')) AS k(experiment_id, unit_id)
CROSS JOIN LATERAL (SELECT variant, exposed_at, propensity FROM unit_state s
                    WHERE s.experiment_id = k.experiment_id AND s.unit_id = k.unit_id LIMIT 1) s
"""
_ASSIGNED = """
SELECT k.experiment_id, k.unit_id, a.variant, extract(epoch FROM a.assigned_at)::float8, a.propensity
FROM ROWS FROM (string_to_table(%s, E'\n'), string_to_table(%s, E'\n')) AS k(experiment_id, unit_id)
CROSS JOIN LATERAL (SELECT variant, assigned_at, propensity FROM assignments a
                    WHERE a.experiment_id = k.experiment_id AND a.unit_id = k.unit_id LIMIT 1) a
"""

# Held outcomes are let go when their unit is exposed: those of the units this batch exposes, or on
# a sweep every one whose unit is exposed by now (which also catches an exposure that another worker
# committed while this one held the outcome).
_RELEASE = """
DELETE FROM held_outcomes h
WHERE h.id IN (
  SELECT o.id FROM ROWS FROM (string_to_table(%(experiments)s, E'\n'), string_to_table(%(units)s, E'\n'))
                  AS k(experiment_id, unit_id)
  CROSS JOIN LATERAL (SELECT id FROM held_outcomes o WHERE o.experiment_id = k.experiment_id
                                                     AND o.unit_id = k.unit_id OFFSET 0) o
  UNION ALL
  SELECT o.id FROM held_outcomes o
  WHERE %(sweep)s AND EXISTS (SELECT 1 FROM unit_state s WHERE s.experiment_id = o.experiment_id
                                                           AND s.unit_id = o.unit_id))
RETURNING h.experiment_id, h.unit_id, h.variant, h.ts, h.reward, h.attribution_seconds, h.vals
"""

_UNITS = ("CREATE TEMPORARY TABLE IF NOT EXISTS unit_sums (experiment_id text, unit_id text, variant text, "
          "exposed_at float8, propensity float8, multiple bool, invocations bigint, conversions bigint, reward float8, "
          "errors bigint, value_sums jsonb) ON COMMIT DELETE ROWS")
# What a batch adds to its units: a new exposure's row is written whole, a stored one's sums added to.
_ADD_UNITS = """
INSERT INTO unit_state AS s (experiment_id, unit_id, variant, exposed_at, propensity, multiple,
                             invocations, conversions, reward, errors, value_sums)
SELECT experiment_id, unit_id, variant, exposed_at, propensity, multiple, invocations, conversions, reward, errors,
       value_sums FROM unit_sums
ON CONFLICT (experiment_id, unit_id) DO UPDATE SET
  invocations = s.invocations + excluded.invocations, conversions = s.conversions + excluded.conversions,
  reward = s.reward + excluded.reward, errors = s.errors + excluded.errors,
  multiple = s.multiple OR excluded.multiple,
  value_sums = CASE WHEN excluded.value_sums = '{}' THEN s.value_sums
                    ELSE abflow_add_values(s.value_sums, excluded.value_sums) END
"""

_BATCH = ("CREATE TEMPORARY TABLE IF NOT EXISTS unit_batch (seq int, kind smallint, experiment_id text, unit_id text, "
          "variant text, ts float8, propensity float8, reward float8, error bool, attribution_seconds float8, vals jsonb) "
          "ON COMMIT DELETE ROWS")

# The events of units of a running rollout in its current stage (those timed at or after the stage's
# start; a late one of an earlier stage is left out: that stage was judged): per unit, the variant
# its latest invocation was served (the stage places it by its hash; only serving processes that have
# not yet read the stage's weights serve it otherwise, in its first moments) and its sums. Held
# outcomes let go now are not among them: they were added here when they first arrived.
_STAGE = """
WITH stage AS (
  SELECT key AS experiment_id, value::float8 AS start FROM jsonb_each_text(%(stages)s::jsonb)),
events AS (
  SELECT b.*, s.start FROM unit_batch b JOIN stage s ON s.experiment_id = b.experiment_id
  WHERE b.ts >= s.start),
named AS (
  SELECT experiment_id, unit_id, jsonb_object_agg(name, total) AS sums
  FROM (SELECT e.experiment_id, e.unit_id, v.key AS name, sum(v.value::float8) AS total
        FROM events e, jsonb_each_text(e.vals) v GROUP BY 1, 2, 3) by_name
  GROUP BY experiment_id, unit_id),
per_unit AS (
  SELECT experiment_id, start, unit_id, (array_agg(variant ORDER BY kind, seq DESC))[1] AS variant,
         count(DISTINCT variant) > 1 AS multiple,
         count(*) FILTER (WHERE kind = 0) AS invocations, count(*) FILTER (WHERE kind = 1) AS conversions,
         coalesce(sum(reward) FILTER (WHERE kind = 1), 0) AS reward, count(*) FILTER (WHERE kind = 0 AND error) AS errors
  FROM events GROUP BY experiment_id, start, unit_id)
INSERT INTO stage_units AS s (experiment_id, stage_start, unit_id, variant, multiple, invocations, conversions, reward,
                              errors, value_sums)
SELECT p.experiment_id, p.start, p.unit_id, p.variant, p.multiple, p.invocations, p.conversions, p.reward, p.errors,
       coalesce(n.sums, '{}')
FROM per_unit p LEFT JOIN named n ON n.experiment_id = p.experiment_id AND n.unit_id = p.unit_id
ORDER BY 1, 2, 3
ON CONFLICT (experiment_id, stage_start, unit_id) DO UPDATE SET
  invocations = s.invocations + excluded.invocations, conversions = s.conversions + excluded.conversions,
  reward = s.reward + excluded.reward, errors = s.errors + excluded.errors,
  variant = CASE WHEN excluded.invocations > 0 THEN excluded.variant ELSE s.variant END,
  multiple = s.multiple OR excluded.multiple OR s.variant <> excluded.variant,
  value_sums = CASE WHEN excluded.value_sums = '{}' THEN s.value_sums
                    ELSE abflow_add_values(s.value_sums, excluded.value_sums) END
"""

_GIVE_UP = """
WITH gone AS (DELETE FROM held_outcomes WHERE held_at < %(before)s RETURNING experiment_id, variant)
SELECT experiment_id, variant, count(*) FROM gone GROUP BY experiment_id, variant
"""


def _lines(keys: list[UnitKey]) -> tuple[str, str]:
    """Units' keys as two texts of lines (ids are printable: no line breaks), which PostgreSQL splits
    (``string_to_table``): passing them as arrays cost a tenth of the worker's Python time."""
    return "\n".join(e for e, _ in keys), "\n".join(u for _, u in keys)


def _lookup(conn: psycopg.Connection, sql: str, keys: Iterable[UnitKey]) -> dict[UnitKey, Exposure]:
    keys = list(keys)
    if not keys:
        return {}
    rows = conn.execute(sql, _lines(keys)).fetchall()
    return {(e, u): Exposure(variant, at, propensity) for e, u, variant, at, propensity in rows}


def _json(values: dict | None) -> str | None:
    if values is None:
        return None
    return orjson.dumps(values).decode() if values else "{}"


def stored_exposures(conn: psycopg.Connection, keys: Iterable[UnitKey]) -> dict[UnitKey, Exposure]:
    """The exposures stored for those of ``keys`` exposed before."""
    return _lookup(conn, _STORED, keys)


def assigned_exposures(conn: psycopg.Connection, keys: Iterable[UnitKey]) -> dict[UnitKey, Exposure]:
    """The assignments the API stored for those of ``keys`` it assigned (an exposure when it came first)."""
    return _lookup(conn, _ASSIGNED, keys)


def release_held(conn: psycopg.Connection, exposing: list[UnitKey], sweep: bool) -> list[UnitEvent]:
    """Delete and return the held outcomes of the units in ``exposing``; with ``sweep``, also those of
    every unit exposed by now."""
    experiments, units = _lines(exposing)
    return [UnitEvent(OUTCOME_KIND, e, u, variant, ts, None, reward, False, seconds, values)
            for e, u, variant, ts, reward, seconds, values in conn.execute(
                _RELEASE, {"experiments": experiments, "units": units, "sweep": sweep}).fetchall()]


def add_units(conn: psycopg.Connection, units: Mapping[UnitKey, UnitSums]) -> None:
    """Write new exposures' rows whole and add to stored ones' sums."""
    with conn.cursor() as cur:
        cur.execute(_UNITS)
        with cur.copy("COPY unit_sums (experiment_id, unit_id, variant, exposed_at, propensity, multiple, "
                      "invocations, conversions, reward, errors, value_sums) FROM STDIN") as copy:
            for (experiment_id, unit_id), unit in units.items():
                exposure = unit.exposure
                copy.write_row((experiment_id, unit_id, exposure.variant, exposure.exposed_at, exposure.propensity,
                                unit.multiple, unit.invocations, unit.conversions, unit.reward, unit.errors,
                                _json(unit.values)))
        cur.execute(_ADD_UNITS)


def hold_outcomes(conn: psycopg.Connection, held: list[UnitEvent], now: float) -> None:
    """Keep outcomes whose unit is not exposed yet, until it is or they have waited too long."""
    with conn.cursor() as cur, cur.copy("COPY held_outcomes (experiment_id, unit_id, variant, ts, reward, "
                                        "attribution_seconds, held_at, vals) FROM STDIN") as copy:
        for e in held:
            copy.write_row((e.experiment_id, e.unit_id, e.variant, e.ts, e.reward, e.attribution_seconds, now,
                            _json(e.values)))


def add_stage_units(conn: psycopg.Connection, events: list[UnitEvent], stages: dict[str, float]) -> None:
    """Add the events of running rollouts' current stages to their units' stage sums (``stages``: per
    experiment, the start of its current stage, epoch seconds)."""
    with conn.cursor() as cur:
        cur.execute(_BATCH)
        with cur.copy("COPY unit_batch (seq, kind, experiment_id, unit_id, variant, ts, propensity, reward, error, "
                      "attribution_seconds, vals) FROM STDIN") as copy:
            for seq, e in enumerate(events):
                copy.write_row((seq, e.kind, e.experiment_id, e.unit_id, e.variant, e.ts, e.propensity, e.reward,
                                e.error, e.attribution_seconds, _json(e.values)))
        cur.execute(_STAGE, {"stages": Jsonb(stages)})


def give_up_held(conn: psycopg.Connection, before: float) -> list[tuple[str, str, int]]:
    """Delete the outcomes held since before ``before`` (epoch seconds); how many, per (experiment, variant)."""
    return [(e, v, int(n)) for e, v, n in conn.execute(_GIVE_UP, {"before": before}).fetchall()]


def add_attributed(conn: psycopg.Connection, attributed: Attributed) -> None:
    """Add a batch's counters and attributed totals, in the caller's transaction, in key order (two
    transactions that lock the same rows in the same order wait for each other, never deadlock)."""
    with conn.cursor() as cur:
        if attributed.totals:
            cur.executemany(
                "INSERT INTO attributed_totals AS t (experiment_id, variant, invocations, conversions, reward_sum, "
                "reward_sq_sum) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (experiment_id, variant) DO UPDATE SET "
                "invocations = t.invocations + excluded.invocations, conversions = t.conversions + excluded.conversions, "
                "reward_sum = t.reward_sum + excluded.reward_sum, reward_sq_sum = t.reward_sq_sum + excluded.reward_sq_sum",
                [(e, v, *total) for (e, v), total in sorted(attributed.totals.items())])
        if attributed.counters:
            cur.executemany(
                "INSERT INTO attribution_counts AS c (experiment_id, variant, reason, count) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (experiment_id, variant, reason) DO UPDATE SET count = c.count + excluded.count, "
                "updated_at = now()",
                [(e, v, r, n) for (e, v, r), n in sorted(attributed.counters.items())])


def attribution_counts(conn: psycopg.Connection, experiment_id: str) -> dict[tuple[str, str], int]:
    """Per (variant, reason)."""
    return {(variant, reason): int(count) for variant, reason, count in conn.execute(
        "SELECT variant, reason, count FROM attribution_counts WHERE experiment_id = %s", (experiment_id,))}


def held_count(conn: psycopg.Connection, experiment_id: str) -> int:
    """Outcomes waiting for their unit's exposure now."""
    return int(conn.execute("SELECT count(*) FROM held_outcomes WHERE experiment_id = %s", (experiment_id,)).fetchone()[0])


def _expression(variable: Variable) -> str:
    terms, indicator, cap = variable
    parts = []
    for name, coefficient in terms:
        # Names are validated by the config (UNIT_VARIABLES or VALUE_NAME): safe to write into the SQL.
        if name in UNIT_VARIABLES:
            column = name
        elif VALUE_NAME.match(name) or WINDOWED_NAME.match(name):
            column = f"coalesce((value_sums ->> '{name}')::float8, 0)"
        else:
            raise ValueError(f"not a unit variable: {name!r}")
        parts.append(f"{float(coefficient)!r} * {column}")
    sql = "(" + " + ".join(parts) + ")"
    if indicator:
        sql = f"({sql} > 0)::int"
    if cap is not None:
        sql = f"least({sql}, {float(cap)!r})"
    return sql


def unit_moments(conn: psycopg.Connection, experiment_id: str, variables: dict[str, Variable],
                 pairs: list[tuple[str, str]], period_starts: list[float] = ()) -> list[tuple]:
    """Per (variant, allocation period of exposure) of the exposed units: (variant, period: 0 before
    the first of ``period_starts`` (epoch seconds, ascending), k from the k-th on; units, units
    exposed to another variant too, the sum of each of ``variables`` in order, and the sum of the
    product of each of ``pairs`` in order)."""
    return conn.execute(
        f"SELECT variant, width_bucket(exposed_at, %s::float8[]), count(*), count(*) FILTER (WHERE multiple), "
        f"{_moment_sums(variables, pairs)} FROM unit_state WHERE experiment_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
        (list(period_starts), experiment_id)).fetchall()


def stage_moments(conn: psycopg.Connection, experiment_id: str, stage_start: float, variables: dict[str, Variable],
                  pairs: list[tuple[str, str]]) -> list[tuple]:
    """As ``unit_moments``, of the units a rollout's stage (started at ``stage_start``) served, each
    in the variant it served them (one period, 0)."""
    return conn.execute(
        f"SELECT variant, 0, count(*), count(*) FILTER (WHERE multiple), {_moment_sums(variables, pairs)} "
        "FROM stage_units WHERE experiment_id = %s AND stage_start = %s GROUP BY 1 ORDER BY 1",
        (experiment_id, stage_start)).fetchall()


def _moment_sums(variables: dict[str, Variable], pairs: list[tuple[str, str]]) -> str:
    expressions = {name: _expression(variable) for name, variable in variables.items()}
    return ", ".join([f"sum({expressions[name]})" for name in variables]
                     + [f"sum({expressions[a]} * {expressions[b]})" for a, b in pairs])


def stage_exposure(conn: psycopg.Connection, experiment_id: str, stage_start: float) -> dict[str, dict[str, int]]:
    """What a rollout's stage served, per variant: its units and their invocations."""
    return {variant: {"units": int(units), "invocations": int(invocations)} for variant, units, invocations in
            conn.execute("SELECT variant, count(*), sum(invocations) FROM stage_units "
                         "WHERE experiment_id = %s AND stage_start = %s GROUP BY 1", (experiment_id, stage_start))}


def exposures(conn: psycopg.Connection, experiment_id: str, version_times: list[float]) -> list[tuple[str, int, int]]:
    """Exposed units per (variant, weights in effect at exposure): (variant, 0 before the first of
    ``version_times`` (epoch seconds, ascending), k from the k-th on, units)."""
    return [(v, int(k), int(n)) for v, k, n in conn.execute(
        "SELECT variant, width_bucket(exposed_at, %s::float8[]), count(*) FROM unit_state WHERE experiment_id = %s "
        "GROUP BY 1, 2", (list(version_times), experiment_id))]


def read_units(engine: Engine, experiment_id: str, variables: dict[str, Variable], pairs: list[tuple[str, str]],
               period_starts: list[float], version_times: list[float]
               ) -> tuple[list[tuple], list[tuple[str, int, int]], dict[tuple[str, str], int]]:
    """``unit_moments``, ``exposures`` and ``attribution_counts`` through a SQLAlchemy engine (the report's)."""
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        found = unit_moments(conn, experiment_id, variables, pairs, period_starts), \
            exposures(conn, experiment_id, version_times), attribution_counts(conn, experiment_id)
        conn.rollback()
        return found
    finally:
        raw.close()
