"""A seeded traffic generator: users, variants with true conversion rates, delays, latencies, errors,
and shadow models called beside the served one.

``generate`` is pure (it only draws from its own random generator) and yields
events in publication order; ``run`` publishes them at a target rate or as
fast as possible and returns what it published, the ground truth that the
aggregates must match.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace

from producers.contracts import Conversion, Event, Invocation, Shadow


@dataclass(frozen=True)
class VariantProfile:
    name: str
    weight: float  # share of users routed to it
    conversion_rate: float
    latency_median_ms: float = 40.0
    latency_sigma: float = 0.5  # of log-latency
    error_rate: float = 0.01
    reward: float = 1.0


@dataclass(frozen=True)
class Fault:
    """Chaos: from ``after_seconds`` into the run, ``variant`` gets slower, fails more, or converts less."""

    variant: str
    after_seconds: float = 0.0
    error_rate: float | None = None  # replaces the variant's error rate
    extra_latency_ms: float = 0.0
    conversion_factor: float = 1.0  # multiplies the conversion rate

    def apply(self, profile: VariantProfile) -> VariantProfile:
        return replace(profile,
                       error_rate=profile.error_rate if self.error_rate is None else self.error_rate,
                       conversion_rate=profile.conversion_rate * self.conversion_factor)


def _parse_spec(text: str, keys, spec_required: bool) -> tuple[str, dict[str, float]]:
    """``NAME:key=number,…`` into the name and the numbers, each key one of ``keys``."""
    name, _, spec = text.partition(":")
    if not name or (spec_required and not spec):
        raise ValueError(f"{text!r}: expected NAME{'' if spec_required else '['}:key=value,…"
                         f"{'' if spec_required else ']'} with keys {', '.join(keys)}")
    values = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in keys:
            raise ValueError(f"{text!r}: unknown key {key!r} ({', '.join(keys)})")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"{text!r}: {key} must be a number, got {value!r}") from None
    return name, values


def parse_fault(text: str) -> Fault:
    """``VARIANT:errors=0.3,latency_ms=200,conversion=0.5,after=30`` (every key optional)."""
    variant, values = _parse_spec(text, ("errors", "latency_ms", "conversion", "after"), spec_required=True)
    if not 0 <= values.get("errors", 0) <= 1 or values.get("conversion", 1) < 0 or values.get("after", 0) < 0 \
            or values.get("latency_ms", 0) < 0:
        raise ValueError(f"{text!r}: errors in [0, 1]; conversion, latency_ms and after >= 0")
    return Fault(variant, values.get("after", 0.0), values.get("errors"), values.get("latency_ms", 0.0),
                 values.get("conversion", 1.0))


@dataclass(frozen=True)
class ShadowProfile:
    """A shadow model called beside every served request: how often it gives the served
    model's answer (when both answer), how often it fails, how fast it is."""

    name: str
    agreement: float = 0.9
    error_rate: float = 0.01
    latency_median_ms: float = 40.0
    latency_sigma: float = 0.5


def parse_shadow(text: str) -> ShadowProfile:
    """``NAME:agree=0.9,errors=0.02,latency_ms=60`` (every key optional)."""
    name, values = _parse_spec(text, ("agree", "errors", "latency_ms"), spec_required=False)
    if not 0 <= values.get("agree", 0) <= 1 or not 0 <= values.get("errors", 0) <= 1 \
            or values.get("latency_ms", 1) <= 0:
        raise ValueError(f"{text!r}: agree and errors in [0, 1]; latency_ms > 0")
    fields_of = {"agree": "agreement", "errors": "error_rate", "latency_ms": "latency_median_ms"}
    return ShadowProfile(name, **{fields_of[key]: value for key, value in values.items()})


@dataclass(frozen=True)
class Scenario:
    experiment_id: str
    variants: tuple[VariantProfile, ...]
    users: int = 10_000
    conversion_delay_mean_s: float = 5.0
    seed: int = 1
    faults: tuple[Fault, ...] = ()
    shadows: tuple[ShadowProfile, ...] = ()

    def variant_of(self, user_id: str) -> VariantProfile:
        """Sticky: a user always lands on the same variant (salted hash of the user id)."""
        digest = hashlib.blake2b(f"{self.experiment_id}:{user_id}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64 * sum(v.weight for v in self.variants)
        for variant in self.variants:
            point -= variant.weight
            if point < 0:
                return variant
        return self.variants[-1]


@dataclass
class Published:
    """Ground truth: what was published, per variant."""

    invocations: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    reward_sum: Counter = field(default_factory=Counter)
    shadows: Counter = field(default_factory=Counter)  # shadow requests per shadow
    shadow_errors: Counter = field(default_factory=Counter)

    def add(self, event: Event) -> None:
        if isinstance(event, Invocation):
            self.invocations[event.variant] += 1
            self.errors[event.variant] += int(event.error)
        elif isinstance(event, Shadow):
            self.shadows[event.variant] += 1
            self.shadow_errors[event.variant] += int(event.error)
        else:
            self.conversions[event.variant] += 1
            self.reward_sum[event.variant] += event.reward

    @property
    def total(self) -> int:
        return sum(self.invocations.values()) + sum(self.conversions.values()) + sum(self.shadows.values())


def generate(scenario: Scenario, invocations: int, clock, router=None):
    """Yield ``invocations`` invocations, the conversions they cause, and a shadow event per
    invocation and shadow, in publication order.

    ``router(user_id) -> (variant name, propensity)`` routes users (e.g. the serving
    SDK on live bandit weights); without one, users are split by the scenario's
    fixed weights. ``clock()`` gives the current epoch seconds. A conversion is yielded once
    the clock has passed its time (so with a real clock it is published after
    its delay); the ones still pending at the end are yielded last, each
    stamped with its own time.
    """
    rng = random.Random(scenario.seed)
    # The seed fixes the traffic (users, variants, outcomes), not the event ids: a second
    # run with the same seed publishes new events, not duplicates of the first run's.
    run_id = uuid.uuid4().hex[:12]
    sequence_of = itertools.count()
    new_event_id = lambda: f"sim-{run_id}-{next(sequence_of)}"  # noqa: E731
    profiles = {v.name: v for v in scenario.variants}
    pending: list[tuple[float, int, Conversion]] = []
    sequence = 0
    started = None
    for _ in range(invocations):
        now = clock()
        started = now if started is None else started
        while pending and pending[0][0] <= now:
            yield heapq.heappop(pending)[2]
        user_id = f"user-{rng.randrange(scenario.users)}"
        if router is None:
            variant = scenario.variant_of(user_id)
            propensity = variant.weight / sum(v.weight for v in scenario.variants)
        else:
            name, propensity = router(user_id)
            variant = profiles[name]
        extra_latency = 0.0
        for fault in scenario.faults:
            if fault.variant == variant.name and now - started >= fault.after_seconds:
                variant = fault.apply(variant)
                extra_latency += fault.extra_latency_ms
        invocation = Invocation(
            event_id=new_event_id(),
            experiment_id=scenario.experiment_id,
            variant=variant.name,
            user_id=user_id,
            timestamp=now,
            propensity=propensity,
            latency_ms=round(variant.latency_median_ms * math.exp(rng.gauss(0, variant.latency_sigma)) + extra_latency, 3),
            error=rng.random() < variant.error_rate,
            model_version=variant.name,
        )
        yield invocation
        for shadow in scenario.shadows:
            error = rng.random() < shadow.error_rate
            agreed = rng.random() < shadow.agreement
            yield Shadow(
                event_id=new_event_id(), experiment_id=scenario.experiment_id, variant=shadow.name,
                served_variant=variant.name, user_id=user_id, timestamp=now,
                latency_ms=round(shadow.latency_median_ms * math.exp(rng.gauss(0, shadow.latency_sigma)), 3),
                error=error, served_latency_ms=invocation.latency_ms, served_error=invocation.error,
                agree=None if error or invocation.error else agreed,
            )
        if not invocation.error and rng.random() < variant.conversion_rate:
            delay = rng.expovariate(1 / scenario.conversion_delay_mean_s) if scenario.conversion_delay_mean_s else 0
            conversion = Conversion(
                event_id=new_event_id(),
                experiment_id=scenario.experiment_id,
                variant=variant.name,
                user_id=user_id,
                timestamp=now + delay,
                reward=variant.reward,
                invocation_id=invocation.event_id,
            )
            sequence += 1
            heapq.heappush(pending, (conversion.timestamp, sequence, conversion))
    while pending:
        yield heapq.heappop(pending)[2]


VIRTUAL_TICK_S = 0.001


def virtual_clock(start: float, tick: float = VIRTUAL_TICK_S):
    """A clock that advances ``tick`` seconds each time it is read."""
    state = [start - tick]

    def clock() -> float:
        state[0] += tick
        return state[0]

    return clock


def run(scenario: Scenario, publisher, invocations: int, rate: float = 0.0, progress: bool = True,
        router=None) -> Published:
    """Publish the scenario's traffic: ``rate`` invocations per second, or as fast as possible when 0."""
    from tqdm import tqdm

    published = Published()
    started = time.monotonic()
    if rate > 0:
        clock = time.time
    else:
        # As fast as possible: a virtual clock, 1 ms per invocation, that ends before
        # the wall clock, so events spread over windows and none lies in the future.
        clock = virtual_clock(time.time() - invocations * VIRTUAL_TICK_S - 10 * scenario.conversion_delay_mean_s)
    bar = tqdm(total=invocations, unit="inv", desc=f"simulating {scenario.experiment_id}", disable=not progress,
               mininterval=0.5)
    sent_invocations = 0
    for event in generate(scenario, invocations, clock, router):
        publisher.publish(event)
        published.add(event)
        if isinstance(event, Invocation):
            sent_invocations += 1
            bar.update(1)
            if rate > 0:
                ahead = sent_invocations / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    publisher.flush()
    bar.close()
    return published


def default_rates(names: list[str], base: float = 0.045, step: float = 0.007) -> dict[str, float]:
    """True conversion rates for a demo: each later variant a little better (seed 001: 4.5 % vs 5.2 %)."""
    return {name: round(base + step * index, 6) for index, name in enumerate(names)}
