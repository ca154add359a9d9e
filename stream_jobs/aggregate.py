"""Validation against the registry and the clock, and per-window aggregation of a batch. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from producers.contracts import INVOCATION, Event, InvalidEvent, parse_event
from stream_jobs.windowing import LATENCY_BUCKETS, latency_bucket, window_start


@dataclass(frozen=True)
class Limits:
    max_event_bytes: int
    max_lateness_seconds: float
    max_future_seconds: float


@dataclass(slots=True)
class Record:
    """One Kafka record as the sink sees it."""

    topic: str
    partition: int
    offset: int
    kind: str  # INVOCATION or CONVERSION
    key: bytes | None
    value: bytes | None


def validate(record: Record, known: dict[str, frozenset[str]], now: float, limits: Limits) -> Event:
    """The record's event, or ``InvalidEvent`` with the reason it must go to the dead letters."""
    if record.value is None:
        raise InvalidEvent("malformed_json", "the record has no value")
    event = parse_event(record.kind, record.value, limits.max_event_bytes)
    variants = known.get(event.experiment_id)
    if variants is None:
        raise InvalidEvent("unknown_experiment", f"no experiment {event.experiment_id!r}")
    if event.variant not in variants:
        raise InvalidEvent("unknown_variant", f"experiment {event.experiment_id!r} has no variant {event.variant!r}")
    if event.timestamp > now + limits.max_future_seconds:
        raise InvalidEvent(
            "timestamp_in_future", f"timestamp is {event.timestamp - now:.0f}s ahead of the worker's clock"
        )
    if event.timestamp < now - limits.max_lateness_seconds:
        raise InvalidEvent(
            "too_late",
            f"timestamp is {now - event.timestamp:.0f}s old; the maximum lateness is {limits.max_lateness_seconds:.0f}s",
        )
    return event


@dataclass(slots=True)
class WindowTotals:
    invocations: int = 0
    conversions: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    errors: int = 0
    latency_count: int = 0
    latency_ms_sum: float = 0.0
    latency_hist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)

    def add(self, event: Event) -> None:
        if event.kind == INVOCATION:
            self.invocations += 1
            if event.error:
                self.errors += 1
            if event.latency_ms is not None:
                self.latency_count += 1
                self.latency_ms_sum += event.latency_ms
                self.latency_hist[latency_bucket(event.latency_ms)] += 1
        else:
            self.conversions += 1
            self.reward_sum += event.reward
            self.reward_sq_sum += event.reward * event.reward


WindowKey = tuple[str, str, int]  # (experiment_id, variant, window_start epoch seconds)


def aggregate(events, window_seconds: int) -> dict[WindowKey, WindowTotals]:
    """Partial sums per (experiment, variant, event-time window) of ``events``."""
    totals: dict[WindowKey, WindowTotals] = {}
    for event in events:
        key = (event.experiment_id, event.variant, window_start(event.timestamp, window_seconds))
        bucket = totals.get(key)
        if bucket is None:
            bucket = totals[key] = WindowTotals()
        bucket.add(event)
    return totals
