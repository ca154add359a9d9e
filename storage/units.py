"""Units, exposures and attributed outcomes, kept by the sink in its batch transaction; and the
units' moments the report reads.

The unit is what was randomized: the user (or the session), the events' ``user_id``.

- **Exposure.** A unit is exposed to an experiment by its first invocation there that the sink
  counts, or by the assignment the API stored for it when that came first. The exposure fixes
  the unit's variant, time and propensity for good.
- **Multiple exposure.** A later invocation in another variant does not move the unit: it stays
  in its first variant (the comparison stays the one that was randomized: intention to treat)
  and is flagged as exposed to more than one variant.
- **Attribution.** Every event of the unit counts for its exposure when its timestamp is at most
  the experiment's ``attribution_window_seconds`` after the exposure's (one a little before it
  counts too: the clocks of different services differ), whatever variant it claims (a claim that
  disagrees is counted as a ``variant_mismatch``) and whenever it arrives. An event after the
  window does not count (``outside_window``). A metric with its own, shorter window reads the unit's
  sums over the events within it: ``revenue@3600``, ``conversions@600`` (``config.windowed``), kept
  in ``value_sums`` beside the full-window sums.
- **Outcomes before their exposure.** Conversions travel on their own topic and may be counted
  before the unit's first invocation: they wait in ``held_outcomes`` and are attributed when the
  exposure arrives, or given up (``no_exposure``) once they have waited ``hold_seconds``.

- **Rollout stages.** A rollout places every unit by its hash, so a returning unit may be served
  another variant at a later stage than the one it was exposed to. For each running rollout the
  events of the current stage are also summed per unit in ``stage_units``, under the variant the
  stage served it: what the stage is judged on.

Exactly once comes from the sink: these statements run in the batch's transaction, with the
offsets and the dedup ids, on the events the batch counts. They are set-based (one COPY of the
batch into a temporary table, then one statement per step), so a batch costs a few round trips
whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from abflow.core.config import UNIT_VARIABLES, VALUE_NAME, WINDOWED_NAME

# Why an event did not count as it claimed (per experiment and variant).
HELD = "held"  # waited for its exposure (a count of arrivals, not of what still waits)
VARIANT_MISMATCH = "variant_mismatch"  # counted, for the exposure's variant
OUTSIDE_WINDOW = "outside_window"  # after the attribution window: not counted
NO_EXPOSURE = "no_exposure"  # its unit was never exposed in time: not counted
REASONS = (HELD, VARIANT_MISMATCH, OUTSIDE_WINDOW, NO_EXPOSURE)

# A per-unit variable the report reads: a linear combination of the unit's sums ((name, coefficient)
# pairs: a column of UNIT_VARIABLES, or a key of value_sums: a value's name or a windowed name),
# optionally turned into an indicator (> 0) or capped at a value.
Variable = tuple[tuple[tuple[str, float], ...], bool, float | None]

_BATCH = ("CREATE TEMPORARY TABLE IF NOT EXISTS unit_batch (seq int, kind smallint, experiment_id text, unit_id text, "
          "variant text, ts float8, propensity float8, reward float8, error bool, attribution_seconds float8, vals jsonb) "
          "ON COMMIT DELETE ROWS")
# A row of a batch: (kind, experiment_id, unit_id, variant, timestamp in epoch seconds, propensity,
# reward, error, attribution window in seconds, named values as JSON text or None), in the order
# the events were read.
INVOCATION_KIND, OUTCOME_KIND = 0, 1

# Held outcomes join the batch when their unit is exposed by now: those of the batch's invoked units
# (exposed by this batch at the latest), or on a sweep every one whose unit is exposed (which also
# catches an exposure that another worker committed while this one held the outcome). The batch's
# units are looked up by key (OFFSET 0 keeps the planner from turning the lookups into a scan of
# every held outcome of every experiment: measured, 30 ms a batch with 200,000 held).
_RELEASE = """
WITH released AS (
  DELETE FROM held_outcomes h
  WHERE h.id IN (
    SELECT o.id FROM (SELECT DISTINCT experiment_id, unit_id FROM unit_batch WHERE kind = 0) k
    CROSS JOIN LATERAL (SELECT id FROM held_outcomes o WHERE o.experiment_id = k.experiment_id
                                                       AND o.unit_id = k.unit_id OFFSET 0) o
    UNION ALL
    SELECT o.id FROM held_outcomes o
    WHERE %(sweep)s AND EXISTS (SELECT 1 FROM unit_state s WHERE s.experiment_id = o.experiment_id
                                                             AND s.unit_id = o.unit_id))
  RETURNING h.experiment_id, h.unit_id, h.variant, h.ts, h.reward, h.attribution_seconds, h.vals)
INSERT INTO unit_batch (seq, kind, experiment_id, unit_id, variant, ts, propensity, reward, error, attribution_seconds,
                        vals)
SELECT -1, 1, experiment_id, unit_id, variant, ts, NULL, reward, false, attribution_seconds, vals FROM released
"""

# One statement per batch: each unit's exposure (stored, or made now by its first invocation, or by
# the API's assignment when that came first), its events attributed, its row written once, the
# outcomes of units without an exposure held; returns per (experiment, variant) the counters and the
# attributed totals to add (rows shared by every partition: ``add_attributed`` writes them last).
_APPLY = """
WITH stored AS (
  -- Stored exposures and the API's assignments are looked up by key, one index probe per unit
  -- (LIMIT 1 keeps the planner from turning the lookups into joins that scan the tables): a batch
  -- costs what its units cost, not what the units of every experiment ever run do. Measured with
  -- 1,000,000 assignments of another experiment: 180 ms a batch spent scanning them.
  SELECT s.experiment_id, s.unit_id, s.variant, s.exposed_at, s.propensity
  FROM (SELECT DISTINCT experiment_id, unit_id FROM unit_batch) k
  CROSS JOIN LATERAL (SELECT * FROM unit_state s WHERE s.experiment_id = k.experiment_id AND s.unit_id = k.unit_id
                      LIMIT 1) s),
first_invocation AS (
  SELECT DISTINCT ON (experiment_id, unit_id) experiment_id, unit_id, variant, ts, propensity
  FROM unit_batch b WHERE kind = 0
    AND NOT EXISTS (SELECT 1 FROM stored s WHERE s.experiment_id = b.experiment_id AND s.unit_id = b.unit_id)
  ORDER BY experiment_id, unit_id, seq),
made AS (
  SELECT f.experiment_id, f.unit_id,
         CASE WHEN a.at IS NULL THEN f.variant ELSE a.variant END AS variant,
         coalesce(a.at, f.ts) AS exposed_at,
         CASE WHEN a.at IS NULL THEN f.propensity ELSE a.propensity END AS propensity
  FROM first_invocation f
  LEFT JOIN LATERAL (SELECT a.variant, extract(epoch FROM a.assigned_at)::float8 AS at, a.propensity
                     FROM assignments a WHERE a.experiment_id = f.experiment_id AND a.unit_id = f.unit_id
                       AND extract(epoch FROM a.assigned_at) <= f.ts LIMIT 1) a ON true),
exposure AS (
  SELECT * FROM stored UNION ALL SELECT * FROM made),
joined AS MATERIALIZED (
  SELECT b.experiment_id, b.unit_id, b.kind, b.variant AS claimed, e.variant, b.reward, b.error, b.vals,
         b.ts <= e.exposed_at + b.attribution_seconds AS inside, b.ts - e.exposed_at AS age
  FROM unit_batch b JOIN exposure e ON e.experiment_id = b.experiment_id AND e.unit_id = b.unit_id),
value_sums AS (
  SELECT experiment_id, unit_id, jsonb_object_agg(name, total) AS sums
  FROM (SELECT experiment_id, unit_id, name, sum(value) AS total FROM (
          SELECT j.experiment_id, j.unit_id, v.key AS name, v.value::float8 AS value
          FROM joined j, jsonb_each_text(j.vals) v WHERE j.inside
          UNION ALL
          -- The sums within a metric's own, shorter window: "name@seconds", of the stream's variables too.
          SELECT j.experiment_id, j.unit_id, v.key || '@' || w.seconds, v.value::float8
          FROM joined j, jsonb_array_elements_text(%(metric_windows)s::jsonb -> j.experiment_id) w(seconds),
               jsonb_each_text(coalesce(j.vals, '{}') || CASE WHEN j.kind = 0
                   THEN jsonb_build_object('invocations', 1, 'errors', j.error::int)
                   ELSE jsonb_build_object('conversions', 1, 'reward', j.reward) END) v
          WHERE j.inside AND j.age <= w.seconds::float8) event_values
        GROUP BY 1, 2, 3) named
  GROUP BY experiment_id, unit_id),
per_unit AS (
  SELECT experiment_id, unit_id,
         count(*) FILTER (WHERE inside AND kind = 0) AS invocations,
         count(*) FILTER (WHERE inside AND kind = 1) AS conversions,
         coalesce(sum(reward) FILTER (WHERE inside AND kind = 1), 0) AS reward,
         coalesce(sum(reward * reward) FILTER (WHERE inside AND kind = 1), 0) AS reward_sq,
         count(*) FILTER (WHERE inside AND kind = 0 AND error) AS errors,
         bool_or(kind = 0 AND claimed <> variant) AS other_variant
  FROM joined GROUP BY experiment_id, unit_id),
written AS (
  INSERT INTO unit_state AS s (experiment_id, unit_id, variant, exposed_at, propensity, multiple,
                               invocations, conversions, reward, errors, value_sums)
  SELECT d.experiment_id, d.unit_id, e.variant, e.exposed_at, e.propensity, d.other_variant,
         d.invocations, d.conversions, d.reward, d.errors, coalesce(v.sums, '{}')
  FROM per_unit d JOIN exposure e ON e.experiment_id = d.experiment_id AND e.unit_id = d.unit_id
  LEFT JOIN value_sums v ON v.experiment_id = d.experiment_id AND v.unit_id = d.unit_id
  ON CONFLICT (experiment_id, unit_id) DO UPDATE SET
    invocations = s.invocations + excluded.invocations, conversions = s.conversions + excluded.conversions,
    reward = s.reward + excluded.reward, errors = s.errors + excluded.errors,
    multiple = s.multiple OR excluded.multiple,
    value_sums = CASE WHEN excluded.value_sums = '{}' THEN s.value_sums
                      ELSE abflow_add_values(s.value_sums, excluded.value_sums) END),
held AS (
  INSERT INTO held_outcomes (experiment_id, unit_id, variant, ts, reward, attribution_seconds, held_at, vals)
  SELECT experiment_id, unit_id, variant, ts, reward, attribution_seconds, %(now)s, vals FROM unit_batch b
  WHERE kind = 1
    AND NOT EXISTS (SELECT 1 FROM exposure e WHERE e.experiment_id = b.experiment_id AND e.unit_id = b.unit_id)
  RETURNING experiment_id, variant)
SELECT experiment_id, variant,
       count(*) FILTER (WHERE NOT inside), count(*) FILTER (WHERE inside AND kind = 1 AND claimed <> variant), 0,
       0, 0, 0, 0
FROM joined GROUP BY experiment_id, variant
UNION ALL
SELECT experiment_id, variant, 0, 0, count(*), 0, 0, 0, 0 FROM held GROUP BY experiment_id, variant
UNION ALL
SELECT d.experiment_id, e.variant, 0, 0, 0, sum(d.invocations), sum(d.conversions), sum(d.reward), sum(d.reward_sq)
FROM per_unit d JOIN exposure e ON e.experiment_id = d.experiment_id AND e.unit_id = d.unit_id
GROUP BY 1, 2
"""

# The events of units of a running rollout in its current stage (those timed at or after the stage's
# start; a late one of an earlier stage is left out: that stage was judged): per unit, the variant
# its latest invocation was served (the stage places it by its hash; only serving processes that have
# not yet read the stage's weights serve it otherwise, in its first moments) and its sums. Held
# outcomes let go now (seq -1) were added here when they first arrived.
_STAGE = """
WITH stage AS (
  SELECT key AS experiment_id, value::float8 AS start FROM jsonb_each_text(%(stages)s::jsonb)),
events AS (
  SELECT b.*, s.start FROM unit_batch b JOIN stage s ON s.experiment_id = b.experiment_id
  WHERE b.seq >= 0 AND b.ts >= s.start),
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


@dataclass
class Attributed:
    """What a batch adds to the rows every partition shares: the counters per (experiment, variant,
    reason) and the attributed totals per (experiment, variant): [invocations, conversions, reward
    sum, reward square sum]."""

    counters: dict[tuple[str, str, str], int] = field(default_factory=dict)
    totals: dict[tuple[str, str], list] = field(default_factory=dict)

    def count(self, experiment_id: str, variant: str, reason: str, n: int) -> None:
        if n:
            key = (experiment_id, variant, reason)
            self.counters[key] = self.counters.get(key, 0) + int(n)


def apply_batch(conn: psycopg.Connection, rows: Iterable[tuple], now: float, hold_seconds: float, sweep: bool,
                metric_windows: dict[str, tuple[int, ...]] | None = None, stages: dict[str, float] | None = None
                ) -> Attributed:
    """Expose, attribute and hold the batch's counted invocations and outcomes (``rows``, see
    ``INVOCATION_KIND``), in the caller's transaction. A ``sweep`` also attributes every held outcome
    whose unit is exposed now and gives up those held for longer than ``hold_seconds``. For each of an
    experiment's ``metric_windows`` (seconds), every unit also sums its variables over the events
    within that window of its exposure (``config.windowed`` names). For each experiment in
    ``stages`` (a running rollout: the start of its current stage, epoch seconds), the units' events
    in the stage are also summed in ``stage_units``.

    Writes only the rows of the batch's units (and held outcomes). What it adds to the rows shared
    with other partitions comes back, for ``add_attributed`` to write just before the commit: two
    transactions that both update a shared row wait for each other from that update to the commit,
    so the later it comes, the more of their work runs at the same time."""
    attributed = Attributed()
    with conn.cursor() as cur:
        cur.execute(_BATCH)
        copied = 0
        with cur.copy("COPY unit_batch (seq, kind, experiment_id, unit_id, variant, ts, propensity, reward, error, "
                      "attribution_seconds, vals) FROM STDIN") as copy:
            for seq, row in enumerate(rows):
                copy.write_row((seq, *row))
                copied += 1
        # Without statistics the planner guesses the batch's size and may scan every unit of the
        # table to join a few hundred; with them it looks the batch's units up by key.
        cur.execute("ANALYZE unit_batch")
        if copied or sweep:
            cur.execute(_RELEASE, {"sweep": sweep})
            windows = Jsonb({e: list(ws) for e, ws in (metric_windows or {}).items() if ws})
            for (experiment_id, variant, outside, mismatched, held, invocations, conversions, reward,
                 reward_sq) in cur.execute(_APPLY, {"now": now, "metric_windows": windows}).fetchall():
                attributed.count(experiment_id, variant, OUTSIDE_WINDOW, outside)
                attributed.count(experiment_id, variant, VARIANT_MISMATCH, mismatched)
                attributed.count(experiment_id, variant, HELD, held)
                if invocations or conversions:
                    total = attributed.totals.setdefault((experiment_id, variant), [0, 0, 0.0, 0.0])
                    for i, added in enumerate((int(invocations), int(conversions), float(reward), float(reward_sq))):
                        total[i] += added
        if copied and stages:
            cur.execute(_STAGE, {"stages": Jsonb(stages)})
        if sweep:
            for experiment_id, variant, count in cur.execute(_GIVE_UP, {"before": now - hold_seconds}).fetchall():
                attributed.count(experiment_id, variant, NO_EXPOSURE, count)
    return attributed


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
