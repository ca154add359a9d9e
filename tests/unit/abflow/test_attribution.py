"""How a batch's events count for their units' exposures (abflow.core.attribution), without I/O. The
same rules through the real PostgreSQL and pipeline: tests/integration/stream_jobs/test_units.py."""

from __future__ import annotations

from abflow.core.attribution import (
    HELD,
    INVOCATION_KIND,
    OUTCOME_KIND,
    OUTSIDE_WINDOW,
    VARIANT_MISMATCH,
    Exposure,
    UnitEvent,
    attribute,
    exposures_made,
)

EXP = "exp"
WINDOW = 3600.0


def inv(unit: str, variant: str, ts: float, error: bool = False, values=None) -> UnitEvent:
    return UnitEvent(INVOCATION_KIND, EXP, unit, variant, ts, 0.5, 0.0, error, WINDOW, values)


def out(unit: str, variant: str, ts: float, reward: float = 1.0, values=None) -> UnitEvent:
    return UnitEvent(OUTCOME_KIND, EXP, unit, variant, ts, None, reward, False, WINDOW, values)


def test_the_first_invocation_in_the_batch_order_exposes_unless_an_earlier_assignment_did():
    events = [inv("u", "B", 110.0), inv("u", "A", 100.0), inv("v", "A", 100.0), inv("w", "A", 100.0)]
    assigned = {(EXP, "v"): Exposure("B", 90.0, 0.3),  # before the first invocation: the exposure
                (EXP, "w"): Exposure("B", 150.0, 0.3)}  # after it: the invocation exposed the unit first
    made = exposures_made(events, {(EXP, "stored"): Exposure("A", 1.0, 0.5)}, assigned)
    assert made == {(EXP, "u"): Exposure("B", 110.0, 0.5), (EXP, "v"): Exposure("B", 90.0, 0.3),
                    (EXP, "w"): Exposure("A", 100.0, 0.5)}
    assert exposures_made([inv("s", "B", 5.0)], {(EXP, "s"): Exposure("A", 1.0, 0.5)}, {}) == {}


def test_events_count_for_the_exposure_whatever_variant_they_claim():
    exposure = Exposure("A", 100.0, 0.5)
    result = attribute([inv("u", "A", 100.0), inv("u", "B", 150.0, error=True), out("u", "B", 200.0, reward=2.5),
                        out("u", "A", 210.0, reward=1.5)], {(EXP, "u"): exposure})
    unit = result.units[(EXP, "u")]
    assert (unit.exposure, unit.multiple, unit.invocations, unit.conversions, unit.reward, unit.errors) == \
        (exposure, True, 2, 2, 4.0, 1)
    assert result.attributed.counters == {(EXP, "A", VARIANT_MISMATCH): 1}
    assert result.attributed.totals == {(EXP, "A"): [2, 2, 4.0, 2.5 ** 2 + 1.5 ** 2]}
    assert result.held == []


def test_an_event_after_the_window_is_not_counted_but_a_slightly_early_one_is():
    result = attribute([out("u", "A", 99.0), out("u", "A", 100.0 + WINDOW), out("u", "A", 100.0 + WINDOW + 1),
                        inv("u", "B", 100.0 + WINDOW + 2)], {(EXP, "u"): Exposure("A", 100.0, 0.5)})
    unit = result.units[(EXP, "u")]
    assert (unit.conversions, unit.invocations, unit.multiple) == (2, 0, True)  # late, yet exposed elsewhere
    assert result.attributed.counters == {(EXP, "A", OUTSIDE_WINDOW): 2}


def test_an_outcome_without_an_exposure_is_held_under_the_variant_it_claims():
    early = out("u", "B", 50.0)
    result = attribute([early], {})
    assert result.held == [early] and result.units == {}
    assert result.attributed.counters == {(EXP, "B", HELD): 1} and result.attributed.totals == {}


def test_named_values_and_the_sums_within_a_metrics_shorter_window():
    result = attribute([inv("u", "A", 100.0, values={"correct": 1.0}), out("u", "A", 130.0, values={"revenue": 5.0}),
                        out("u", "A", 200.0, reward=2.0, values={"revenue": 7.0})],
                       {(EXP, "u"): Exposure("A", 100.0, 0.5)}, {EXP: (60,)})
    assert result.units[(EXP, "u")].values == {
        "correct": 1.0, "revenue": 12.0,
        # within 60 s of the exposure: the invocation and the first outcome, the stream's variables too
        "correct@60": 1.0, "invocations@60": 1.0, "errors@60": 0.0, "revenue@60": 5.0, "conversions@60": 1.0,
        "reward@60": 1.0}
