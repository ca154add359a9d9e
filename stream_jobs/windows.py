"""A batch's counted events summed per (experiment, variant, time window), and its shadow events
per (experiment, shadow, served variant, window). Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket, window_start
from producers.contracts import INVOCATION, Event, Shadow


@dataclass(slots=True)
class LatencyTotals:
    count: int = 0
    ms_sum: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)

    def add(self, latency_ms: float | None) -> None:
        if latency_ms is not None:
            self.count += 1
            self.ms_sum += latency_ms
            self.hist[latency_bucket(latency_ms)] += 1


@dataclass(slots=True)
class WindowTotals:
    invocations: int = 0
    conversions: int = 0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    errors: int = 0
    latency: LatencyTotals = field(default_factory=LatencyTotals)

    def add(self, event: Event) -> None:
        if event.kind == INVOCATION:
            self.invocations += 1
            if event.error:
                self.errors += 1
            self.latency.add(event.latency_ms)
        else:
            self.conversions += 1
            self.reward_sum += event.reward
            self.reward_sq_sum += event.reward * event.reward


WindowKey = tuple[str, str, int]  # (experiment_id, variant, window_start epoch seconds)


@dataclass(slots=True)
class ShadowTotals:
    """A shadow beside the served variant over one window: how often they agreed, and each side's
    errors and latency on the same requests."""

    requests: int = 0
    compared: int = 0  # both sides answered
    agreements: int = 0
    errors: int = 0
    served_errors: int = 0
    both_errors: int = 0  # with the two above: the paired 2×2 table of errors
    latency: LatencyTotals = field(default_factory=LatencyTotals)
    served_latency: LatencyTotals = field(default_factory=LatencyTotals)

    def add(self, event: Shadow) -> None:
        self.requests += 1
        self.errors += event.error
        self.served_errors += event.served_error
        self.both_errors += event.error and event.served_error
        if event.agree is not None:
            self.compared += 1
            self.agreements += event.agree
        self.latency.add(event.latency_ms)
        self.served_latency.add(event.served_latency_ms)


ShadowKey = tuple[str, str, str, int]  # (experiment_id, shadow variant, served variant, window_start)


def aggregate(events, window_seconds: int) -> dict[WindowKey, WindowTotals]:
    """Partial sums per (experiment, variant, event-time window) of invocations and conversions."""
    totals: dict[WindowKey, WindowTotals] = {}
    for event in events:
        key = (event.experiment_id, event.variant, window_start(event.timestamp, window_seconds))
        bucket = totals.get(key)
        if bucket is None:
            bucket = totals[key] = WindowTotals()
        bucket.add(event)
    return totals


def aggregate_shadows(events, window_seconds: int) -> dict[ShadowKey, ShadowTotals]:
    """Partial sums per (experiment, shadow, served variant, event-time window) of shadow events."""
    totals: dict[ShadowKey, ShadowTotals] = {}
    for event in events:
        key = (event.experiment_id, event.variant, event.served_variant, window_start(event.timestamp, window_seconds))
        bucket = totals.get(key)
        if bucket is None:
            bucket = totals[key] = ShadowTotals()
        bucket.add(event)
    return totals
