"""A batch's units: exposed, their events attributed, outcomes held, in the batch's transaction.

The rules are ``abflow.core.attribution``'s (pure); the statements ``storage.units``'. This module
runs them in order: look up the units' stored exposures, let go of the outcomes held for the units
the batch exposes, attribute, then write the units' sums, the outcomes still held and the rollout
stages' sums.
"""

from __future__ import annotations

import psycopg

from abflow.core.attribution import INVOCATION_KIND, NO_EXPOSURE, Attributed, UnitEvent, attribute, exposures_made
from storage import units as store


def apply_batch(conn: psycopg.Connection, events: list[UnitEvent], now: float, hold_seconds: float, sweep: bool,
                metric_windows: dict[str, tuple[int, ...]] | None = None, stages: dict[str, float] | None = None
                ) -> Attributed:
    """Expose, attribute and hold the batch's counted invocations and outcomes (in the order they
    were read), in the caller's transaction. A ``sweep`` also attributes every held outcome whose
    unit is exposed now and gives up those held for longer than ``hold_seconds``. For each of an
    experiment's ``metric_windows`` (seconds), every unit also sums its variables over the events
    within that window of its exposure (``config.windowed`` names). For each experiment in
    ``stages`` (a running rollout: the start of its current stage, epoch seconds), the units' events
    in the stage are also summed in ``stage_units``.

    PostgreSQL looks the units' exposures up and adds what ``attribute`` found to their rows: a
    batch costs a few round trips and one write per unit, whatever its size. Writes only the rows
    of the batch's units (and held outcomes). What it adds to the rows shared with other partitions
    comes back, for ``add_attributed`` to write just before the commit: two transactions that both
    update a shared row wait for each other from that update to the commit, so the later it comes,
    the more of their work runs at the same time."""
    keys = dict.fromkeys((e.experiment_id, e.unit_id) for e in events)
    stored = store.stored_exposures(conn, keys)
    exposing = [key for key in dict.fromkeys((e.experiment_id, e.unit_id) for e in events
                                             if e.kind == INVOCATION_KIND) if key not in stored]
    released: list[UnitEvent] = []
    if exposing or sweep:
        released = store.release_held(conn, exposing, sweep)
        stored.update(store.stored_exposures(conn, {(e.experiment_id, e.unit_id) for e in released} - stored.keys()))
    # Released outcomes come first: they arrived before the batch's events.
    exposures = {**stored, **exposures_made(events, stored, store.assigned_exposures(conn, exposing))}
    result = attribute(released + events, exposures, metric_windows)
    if result.units:
        store.add_units(conn, result.units)
    if result.held:
        store.hold_outcomes(conn, result.held, now)
    staged = [e for e in events if e.experiment_id in stages] if stages else []
    if staged:
        store.add_stage_units(conn, staged, stages)
    if sweep:
        for experiment_id, variant, count in store.give_up_held(conn, now - hold_seconds):
            result.attributed.count(experiment_id, variant, NO_EXPOSURE, count)
    return result.attributed
