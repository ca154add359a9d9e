"""A record's event, checked against the contract, the registry and the clock. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from producers.contracts import SHADOW, Event, InvalidEvent, check_clock, parse_event
from stream_jobs.records import Record


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int
    max_lateness_seconds: float
    max_future_seconds: float


def validate(record: Record, known: dict[str, frozenset[str]], now: float, limits: Limits,
             shadows: dict[str, frozenset[str]] | None = None) -> Event:
    """The record's event, or ``InvalidEvent`` with the reason it must go to the dead letters.

    ``known`` holds each experiment's variants, ``shadows`` its shadow variants."""
    if record.value is None:
        raise InvalidEvent("malformed_json", "the record has no value")
    event = parse_event(record.kind, record.value, limits.max_event_bytes)
    variants = known.get(event.experiment_id)
    if variants is None:
        raise InvalidEvent("unknown_experiment", f"no experiment {event.experiment_id!r}")
    if event.kind == SHADOW:
        if event.variant not in (shadows or {}).get(event.experiment_id, ()):
            raise InvalidEvent("unknown_variant",
                               f"experiment {event.experiment_id!r} has no shadow {event.variant!r}")
        if event.served_variant not in variants:
            raise InvalidEvent("unknown_variant",
                               f"experiment {event.experiment_id!r} has no variant {event.served_variant!r}")
    elif event.variant not in variants:
        raise InvalidEvent("unknown_variant", f"experiment {event.experiment_id!r} has no variant {event.variant!r}")
    check_clock(event.timestamp, now, limits.max_future_seconds, limits.max_lateness_seconds)
    return event
