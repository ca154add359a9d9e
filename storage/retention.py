"""Retention: what grows with time rather than with units, deleted once it is older than the
operator's horizon. ``abflow db prune`` runs it on demand; the refresher's leader runs it hourly.

- ``variant_windows`` and ``shadow_windows``: per-minute telemetry (traffic, errors, latency).
  A report reads the windows that remain: the latency quantiles of an experiment older than the
  horizon cover the horizon only. The unit-level statistics do not read them.
- ``allocations``: every version of the weights (a bandit writes one whenever its data moves the
  weights). Each experiment keeps its latest version whatever its age. A report stratifies by
  the versions that remain: units exposed before the oldest kept one form one stratum.
- ``dead_letter_counts``: a (topic, reason) not seen within the horizon.
- ``dedup_batches``: the ids counted beyond the dedup horizon (the sink prunes them too).

Nothing the statistics are computed from (units, exposures, attributed totals, offsets) is
pruned here: those grow with units, not time.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from abflow.settings import Settings

DAY = 86_400.0


@dataclass(frozen=True)
class Retention:
    """How long each kind of row is kept, in days; None keeps it for ever."""

    windows_days: float | None = 30.0
    allocations_days: float | None = 90.0
    dead_letters_days: float | None = 30.0
    dedup_horizon_seconds: float = 900.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Retention":
        def days(value: float) -> float | None:
            return value or None  # 0: for ever

        return cls(days(settings.retention_windows_days), days(settings.retention_allocations_days),
                   days(settings.retention_dead_letters_days), float(settings.dedup_horizon_seconds))


# Per table: the cutoff it is pruned at (a key of ``prune``'s cutoffs) and its statement.
_STATEMENTS = {
    "variant_windows": ("windows", "DELETE FROM variant_windows WHERE window_start < to_timestamp(%(windows)s)"),
    "shadow_windows": ("windows", "DELETE FROM shadow_windows WHERE window_start < to_timestamp(%(windows)s)"),
    "allocations": ("allocations", "DELETE FROM allocations a WHERE a.computed_at < to_timestamp(%(allocations)s) "
                    "AND a.version < (SELECT max(l.version) FROM allocations l WHERE l.experiment_id = a.experiment_id)"),
    "dead_letter_counts": ("dead_letters",
                           "DELETE FROM dead_letter_counts WHERE last_seen_at < to_timestamp(%(dead_letters)s)"),
    "dedup_batches": ("dedup", "DELETE FROM dedup_batches WHERE created_at < to_timestamp(%(dedup)s)"),
}


def prune(conn: psycopg.Connection, retention: Retention, now: float, dry_run: bool = False) -> dict[str, int]:
    """Delete what is older than ``retention`` at ``now`` (epoch seconds), in one transaction; the rows
    deleted per table (with ``dry_run``, the rows that would be, and nothing is deleted)."""
    cutoffs = {
        "windows": None if retention.windows_days is None else now - retention.windows_days * DAY,
        "allocations": None if retention.allocations_days is None else now - retention.allocations_days * DAY,
        "dead_letters": None if retention.dead_letters_days is None else now - retention.dead_letters_days * DAY,
        # A minute past the horizon, as the sink prunes: a batch still reloading the horizon keeps its ids.
        "dedup": now - retention.dedup_horizon_seconds - 60.0,
    }
    deleted: dict[str, int] = {}
    with conn.transaction(force_rollback=dry_run), conn.cursor() as cur:
        for table, (cutoff, statement) in _STATEMENTS.items():
            if cutoffs[cutoff] is None:
                continue
            cur.execute(statement, cutoffs)
            deleted[table] = cur.rowcount
    return deleted
