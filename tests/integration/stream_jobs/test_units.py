"""Exposures, attribution and held outcomes (stream_jobs.units, storage.units) on the real PostgreSQL, one batch
transaction at a time, as the sink runs them."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from abflow.core.attribution import (
    HELD,
    INVOCATION_KIND,
    NO_EXPOSURE,
    OUTCOME_KIND,
    OUTSIDE_WINDOW,
    VARIANT_MISMATCH,
    UnitEvent,
)
from producers.contracts import Conversion, Invocation
from storage.db import connect
from storage.units import add_attributed, attribution_counts, held_count
from stream_jobs.units import apply_batch
from tests.helpers import make_experiment

WINDOW = 60
ATTRIBUTION = 3600.0
HOLD = 600.0
T0 = float(int(time.time()) // WINDOW * WINDOW)


@pytest.fixture
def db(stack):
    with connect(stack.database_url, autocommit=False) as conn:
        yield conn


@pytest.fixture
def exp():
    return f"units-{uuid.uuid4().hex[:8]}"


def inv(exp: str, unit: str, variant: str, t: float, error: bool = False, propensity: float | None = 0.5) -> Invocation:
    return Invocation(uuid.uuid4().hex, exp, variant, unit, t, propensity, 10.0, error)


def conv(exp: str, unit: str, variant: str, t: float, reward: float = 1.0) -> Conversion:
    return Conversion(uuid.uuid4().hex, exp, variant, unit, t, reward)


def rows(events) -> list[UnitEvent]:
    """Events as the sink hands them over."""
    return [UnitEvent(INVOCATION_KIND, e.experiment_id, e.user_id, e.variant, e.timestamp, e.propensity, 0.0, e.error,
                      ATTRIBUTION, e.values)
            if isinstance(e, Invocation) else
            UnitEvent(OUTCOME_KIND, e.experiment_id, e.user_id, e.variant, e.timestamp, None, e.reward, False,
                      ATTRIBUTION, e.values)
            for e in events]


def run(db, exp: str, events, now: float = T0, sweep: bool = False) -> dict:
    """One batch, committed; the counters it added, per (variant, reason)."""
    attributed = apply_batch(db, rows(events), now, HOLD, sweep)
    add_attributed(db, attributed)
    db.commit()
    return {(variant, reason): n for (_, variant, reason), n in attributed.counters.items()}


def unit(db, exp: str, unit_id: str) -> dict | None:
    row = db.execute("SELECT variant, exposed_at, propensity, multiple, invocations, conversions, "
                     "reward, errors FROM unit_state WHERE experiment_id = %s AND unit_id = %s", (exp, unit_id)).fetchone()
    db.rollback()
    if row is None:
        return None
    keys = ("variant", "exposed_at", "propensity", "multiple", "invocations", "conversions", "reward", "errors")
    return dict(zip(keys, row))


def test_the_first_invocation_exposes_and_later_events_count_for_it(db, exp):
    assert run(db, exp, [inv(exp, "u", "A", T0 + 5), inv(exp, "u", "A", T0 + 10, error=True),
                         conv(exp, "u", "A", T0 + 20, reward=2.5)]) == {}
    run(db, exp, [conv(exp, "u", "A", T0 + 30)])
    assert unit(db, exp, "u") == {"variant": "A", "exposed_at": T0 + 5, "propensity": 0.5,
                                  "multiple": False, "invocations": 2, "conversions": 2, "reward": 3.5, "errors": 1}


def test_a_unit_stays_in_its_first_variant_and_a_multiple_exposure_is_flagged(db, exp):
    run(db, exp, [inv(exp, "u", "A", T0)])
    counters = run(db, exp, [inv(exp, "u", "B", T0 + 5), inv(exp, "u", "B", T0 + 6), conv(exp, "u", "B", T0 + 7)])
    state = unit(db, exp, "u")
    assert (state["variant"], state["multiple"], state["invocations"], state["conversions"]) == ("A", True, 3, 1)
    assert counters == {("A", VARIANT_MISMATCH): 1}


def test_an_outcome_before_its_exposure_is_held_then_attributed_once(db, exp):
    assert run(db, exp, [conv(exp, "u", "B", T0 + 50)]) == {("B", HELD): 1}
    assert unit(db, exp, "u") is None and held_count(db, exp) == 1
    run(db, exp, [inv(exp, "u", "B", T0)])
    run(db, exp, [inv(exp, "u", "B", T0 + 2)])
    assert unit(db, exp, "u")["conversions"] == 1 and unit(db, exp, "u")["invocations"] == 2
    assert held_count(db, exp) == 0
    assert attribution_counts(db, exp) == {("B", HELD): 1}


def test_events_after_the_attribution_window_do_not_count(db, exp):
    run(db, exp, [inv(exp, "u", "A", T0)])
    counters = run(db, exp, [conv(exp, "u", "A", T0 + ATTRIBUTION + 1), inv(exp, "u", "A", T0 + 4000)])
    state = unit(db, exp, "u")
    assert (state["invocations"], state["conversions"]) == (1, 0)
    assert counters == {("A", OUTSIDE_WINDOW): 2}


def test_an_outcome_that_waits_too_long_is_given_up_on_a_sweep(db, exp):
    run(db, exp, [conv(exp, "u", "B", T0 - 5000)], now=T0)  # it waits from its arrival, not its timestamp
    assert run(db, exp, [], now=T0 + HOLD - 1, sweep=True) == {}
    assert held_count(db, exp) == 1
    assert run(db, exp, [], now=T0 + HOLD + 1, sweep=True) == {("B", NO_EXPOSURE): 1}
    assert held_count(db, exp) == 0
    run(db, exp, [inv(exp, "u", "B", T0)])
    assert unit(db, exp, "u")["conversions"] == 0


def test_a_sweep_attributes_an_outcome_held_beside_an_exposure_committed_elsewhere(stack, db, exp):
    """Two workers during a rebalance: one holds an outcome while the other's exposure of the unit
    is not committed yet. The next sweep attributes it."""
    with connect(stack.database_url, autocommit=False) as other:
        add_attributed(other, apply_batch(other, rows([inv(exp, "u", "A", T0)]), T0, HOLD, False))
        run(db, exp, [conv(exp, "u", "A", T0 + 1)])  # does not see the uncommitted exposure
        other.commit()
    assert held_count(db, exp) == 1 and unit(db, exp, "u")["conversions"] == 0
    run(db, exp, [], sweep=True)
    assert held_count(db, exp) == 0 and unit(db, exp, "u")["conversions"] == 1


def test_an_assignment_the_api_stored_is_the_exposure(stack, engine, db):
    exp = make_experiment(engine, variants=("A", "B"))
    db.execute("INSERT INTO assignments (experiment_id, unit_id, variant, propensity) VALUES (%s, 'u', 'B', 0.2)", (exp,))
    db.commit()
    later = time.time() + 5
    run(db, exp, [inv(exp, "u", "A", later)])
    state = unit(db, exp, "u")
    assert (state["variant"], state["propensity"], state["multiple"]) == ("B", 0.2, True)  # served A, assigned B
    assert state["exposed_at"] < later


def test_how_events_are_cut_into_batches_does_not_change_the_units(db):
    """The sink applies whatever batches the consumer hands it: 17 batches end in the same units as
    one (a unit's events keep their order, as on its partition)."""
    rng = np.random.default_rng(5)
    events = []
    for u in range(300):
        variant = "AB"[u % 2]
        t = T0 + rng.uniform(0, 600)
        events.append(("i", f"u{u}", variant, t, bool(rng.random() < 0.1), 0.0))
        for _ in range(rng.poisson(2)):
            events.append(("i", f"u{u}", variant, t + rng.uniform(0, 5000), bool(rng.random() < 0.1), 0.0))
        for _ in range(rng.poisson(0.5)):
            events.append(("c", f"u{u}", variant, t + rng.uniform(-30, 5000), False, float(rng.uniform(0, 5))))
    order = rng.permutation(len(events))  # conversions before their exposure too

    def stored(exp: str, batches) -> list:
        for batch in batches:
            run(db, exp, [inv(exp, u, v, t, error=e) if kind == "i" else conv(exp, u, v, t, reward=r)
                          for kind, u, v, t, e, r in (events[i] for i in batch)])
        rows = db.execute("SELECT unit_id, variant, exposed_at, invocations, conversions, reward, errors "
                          "FROM unit_state WHERE experiment_id = %s ORDER BY unit_id", (exp,)).fetchall()
        db.rollback()
        return [(row[0], row[1], row[2], *[round(v, 9) for v in row[3:]]) for row in rows]

    first, second = f"whole-{uuid.uuid4().hex[:6]}", f"cut-{uuid.uuid4().hex[:6]}"
    whole = stored(first, [order])
    cut = stored(second, np.array_split(order, 17))
    assert cut == whole and len(whole) == 300
    # Held arrivals depend on the cut (within one batch an exposure comes first); nothing else does.
    assert {k: n for k, n in attribution_counts(db, first).items() if k[1] != HELD} == \
        {k: n for k, n in attribution_counts(db, second).items() if k[1] != HELD}


def test_the_report_shows_what_did_not_count(engine, db):
    """An outcome after the attribution window is not counted and is reported; so is a mismatch."""
    from bandit_service.report.build import build_report
    from bandit_service.report.load import load_report_input
    from bandit_service.report.render import render_text

    exp = make_experiment(engine, variants=("A", "B"))
    run(db, exp, [inv(exp, "u1", "A", T0), inv(exp, "u2", "B", T0)])
    run(db, exp, [conv(exp, "u1", "A", T0 + ATTRIBUTION + 5), conv(exp, "u2", "A", T0 + 5)])
    report = build_report(load_report_input(engine, exp))
    assert report["attribution"]["events"] == [{"variant": "A", "reason": OUTSIDE_WINDOW, "count": 1},
                                               {"variant": "B", "reason": VARIANT_MISMATCH, "count": 1}]
    # The mismatched conversion counts for u2's exposure (B); the late one counts nowhere.
    assert {v["variant"]: v["converted_units"] for v in report["variants"]} == {"A": 0, "B": 1}
    assert "A outside window 1, B variant mismatch 1" in render_text(report)
