"""How a batch's events count for their units' exposures (pure: ``storage.units`` looks up what is
stored, calls ``attribute`` and writes what it returns, in the batch's transaction).

- **Exposure.** A unit is exposed to an experiment by its first invocation there that is counted,
  or by the assignment the API stored for it when that came first. The exposure fixes the unit's
  variant, time and propensity for good.
- **Multiple exposure.** A later invocation in another variant does not move the unit: it stays in
  its first variant (the comparison stays the one that was randomized: intention to treat) and is
  flagged as exposed to more than one variant.
- **Attribution.** Every event of the unit counts for its exposure when its timestamp is at most
  its attribution window after the exposure's (one a little before it counts too: the clocks of
  different services differ), whatever variant it claims (a claim that disagrees is counted as a
  ``variant_mismatch``) and whenever it arrives. An event after the window does not count
  (``outside_window``). A metric with its own, shorter window reads the unit's sums over the events
  within it: ``revenue@3600``, ``conversions@600`` (``config.windowed``), kept beside the
  full-window sums.
- **Outcomes before their exposure** are held until an invocation exposes the unit (``held``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from abflow.core.config import windowed

# Why an event did not count as it claimed (per experiment and variant).
HELD = "held"  # waited for its exposure (a count of arrivals, not of what still waits)
VARIANT_MISMATCH = "variant_mismatch"  # counted, for the exposure's variant
OUTSIDE_WINDOW = "outside_window"  # after the attribution window: not counted
NO_EXPOSURE = "no_exposure"  # its unit was never exposed in time: not counted
REASONS = (HELD, VARIANT_MISMATCH, OUTSIDE_WINDOW, NO_EXPOSURE)

INVOCATION_KIND, OUTCOME_KIND = 0, 1

UnitKey = tuple[str, str]  # (experiment_id, unit_id)


class UnitEvent(NamedTuple):
    """A counted invocation or outcome, as the sink hands it over."""

    kind: int  # INVOCATION_KIND or OUTCOME_KIND
    experiment_id: str
    unit_id: str
    variant: str  # the variant the event claims
    ts: float  # epoch seconds
    propensity: float | None  # of an invocation
    reward: float  # of an outcome
    error: bool  # of an invocation
    attribution_seconds: float
    values: dict[str, float] | None


class Exposure(NamedTuple):
    variant: str
    exposed_at: float  # epoch seconds
    propensity: float | None


@dataclass(slots=True)
class UnitSums:
    """What a batch adds to one exposed unit."""

    exposure: Exposure
    multiple: bool = False
    invocations: int = 0
    conversions: int = 0
    reward: float = 0.0
    errors: int = 0
    values: dict[str, float] = field(default_factory=dict)

    def add_values(self, values: Mapping[str, float], suffix: str = "") -> None:
        for name, value in values.items():
            key = name + suffix
            self.values[key] = self.values.get(key, 0.0) + value


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


@dataclass
class Attribution:
    """A batch attributed: the sums to add per exposed unit (a new exposure's unit carries it), the
    outcomes to hold, and the shared counters and totals."""

    units: dict[UnitKey, UnitSums] = field(default_factory=dict)
    held: list[UnitEvent] = field(default_factory=list)
    attributed: Attributed = field(default_factory=Attributed)


def exposures_made(events: Iterable[UnitEvent], stored: Mapping[UnitKey, Exposure],
                   assigned: Mapping[UnitKey, Exposure]) -> dict[UnitKey, Exposure]:
    """The exposures of units not exposed before (not in ``stored``) that the batch exposes: by their
    first invocation in the batch's order, or by the API's assignment (``assigned``) when that came
    before it."""
    made: dict[UnitKey, Exposure] = {}
    for event in events:
        if event.kind != INVOCATION_KIND:
            continue
        key = (event.experiment_id, event.unit_id)
        if key in stored or key in made:
            continue
        assignment = assigned.get(key)
        made[key] = assignment if assignment is not None and assignment.exposed_at <= event.ts \
            else Exposure(event.variant, event.ts, event.propensity)
    return made


def attribute(events: Iterable[UnitEvent], exposures: Mapping[UnitKey, Exposure],
              metric_windows: Mapping[str, tuple[int, ...]] | None = None) -> Attribution:
    """Count each event for its unit's exposure (stored, or made by this batch: ``exposures``);
    an outcome whose unit has none is held. ``metric_windows``: per experiment, the shorter
    attribution windows (seconds) its metrics ask sums for."""
    result = Attribution()
    units, attributed = result.units, result.attributed
    windows_of = metric_windows or {}
    for event in events:
        key = (event.experiment_id, event.unit_id)
        exposure = exposures.get(key)
        if exposure is None:  # only an outcome: an invocation exposes its unit
            result.held.append(event)
            attributed.count(event.experiment_id, event.variant, HELD, 1)
            continue
        unit = units.get(key)
        if unit is None:
            unit = units[key] = UnitSums(exposure)
        invocation = event.kind == INVOCATION_KIND
        if invocation and event.variant != exposure.variant:
            unit.multiple = True
        if event.ts > exposure.exposed_at + event.attribution_seconds:
            attributed.count(event.experiment_id, exposure.variant, OUTSIDE_WINDOW, 1)
            continue
        total = attributed.totals.get((event.experiment_id, exposure.variant))
        if total is None:
            total = attributed.totals[(event.experiment_id, exposure.variant)] = [0, 0, 0.0, 0.0]
        if invocation:
            unit.invocations += 1
            unit.errors += int(event.error)
            total[0] += 1
        else:
            unit.conversions += 1
            unit.reward += event.reward
            total[1] += 1
            total[2] += event.reward
            total[3] += event.reward * event.reward
            if event.variant != exposure.variant:
                attributed.count(event.experiment_id, exposure.variant, VARIANT_MISMATCH, 1)
        if event.values:
            unit.add_values(event.values)
        windows = windows_of.get(event.experiment_id)
        if windows:  # the sums within a metric's shorter window, of the stream's variables too
            age = event.ts - exposure.exposed_at
            stream = {"invocations": 1.0, "errors": float(event.error)} if invocation \
                else {"conversions": 1.0, "reward": event.reward}
            named = {**(event.values or {}), **stream}
            for seconds in windows:
                if age <= seconds:
                    unit.add_values(named, suffix=windowed("", seconds))  # "name@seconds"
    return result
