"""Event contracts, the experiment config and window maths: pure functions."""

from __future__ import annotations

import math

import orjson
import pytest

from abflow.core.config import ConfigError, load_config_text, parse_config
from abflow.core.windowing import LATENCY_BUCKET_EDGES_MS, LATENCY_BUCKETS, histogram_quantile, latency_bucket, window_start
from producers.contracts import REASONS, Conversion, InvalidEvent, Invocation, encode, parse_event, parse_timestamp
from stream_jobs.records import Record
from stream_jobs.validate import Limits, validate
from stream_jobs.windows import aggregate

BASE = {"event_id": "e1", "experiment_id": "exp", "variant": "A", "user_id": "u1", "timestamp": 1_700_000_000.5}


def reason_of(kind: str, payload) -> str:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    with pytest.raises(InvalidEvent) as info:
        parse_event(kind, raw, max_bytes=1024)
    assert info.value.reason in REASONS
    return info.value.reason


def test_valid_events_round_trip():
    inv = parse_event("invocation", orjson.dumps({**BASE, "propensity": 0.25, "latency_ms": 12, "error": True,
                                                  "model_version": "v2"}))
    assert inv == Invocation("e1", "exp", "A", "u1", 1_700_000_000.5, 0.25, 12.0, True, "v2")
    assert parse_event("invocation", encode(inv)) == inv
    conv = parse_event("conversion", orjson.dumps({**BASE, "invocation_id": "e0"}))
    assert conv == Conversion("e1", "exp", "A", "u1", 1_700_000_000.5, 1.0, "e0")  # reward defaults to 1.0
    assert parse_event("conversion", encode(conv)) == conv


def test_named_values_round_trip_on_both_kinds():
    inv = parse_event("invocation", orjson.dumps({**BASE, "values": {"correct": 1, "labelled": 1, "confidence": 0.8}}))
    assert inv.values == {"correct": 1.0, "labelled": 1.0, "confidence": 0.8}
    assert parse_event("invocation", encode(inv)) == inv
    conv = parse_event("conversion", orjson.dumps({**BASE, "values": {"revenue": 12.5, "tp": 1}}))
    assert conv.values == {"revenue": 12.5, "tp": 1.0} and parse_event("conversion", encode(conv)) == conv


@pytest.mark.parametrize("kind", ["invocation", "conversion"])
@pytest.mark.parametrize("values, reason, detail", [
    ([1, 2], "wrong_type", "'values' must be an object"),
    ({"Revenue": 1}, "invalid_value", "'Revenue' is not a value name"),
    ({"errors": 1}, "invalid_value", "not one of invocations"),  # the stream's own variables are reserved
    ({"revenue": "12"}, "wrong_type", "'values.revenue' must be a number"),
    ({"correct": True}, "wrong_type", "'values.correct' must be a number"),
    ({f"v{i}": 1 for i in range(33)}, "invalid_value", "at most 32"),
])
def test_bad_values_name_the_field(kind, values, reason, detail):
    with pytest.raises(InvalidEvent) as info:
        parse_event(kind, orjson.dumps({**BASE, "values": values}), max_bytes=4096)
    assert info.value.reason == reason and detail in info.value.detail
    raw = orjson.dumps({**BASE, "values": {"x": 1}})[:-2] + b'1e400}}'
    assert reason_of(kind, raw) == "non_finite"


@pytest.mark.parametrize("payload, reason", [
    (b"{oops", "malformed_json"),
    (b"\xff\xfe", "malformed_json"),
    (b'"a string"', "not_an_object"),
    ({k: v for k, v in BASE.items() if k != "variant"}, "missing_field"),
    ({**BASE, "user_id": 42}, "wrong_type"),
    ({**BASE, "user_id": ""}, "invalid_value"),
    ({**BASE, "user_id": "a\nb"}, "invalid_value"),
    ({**BASE, "event_id": "x" * 300}, "invalid_value"),
    ({**BASE, "error": "yes"}, "wrong_type"),
    ({**BASE, "latency_ms": -1}, "invalid_value"),
    ({**BASE, "latency_ms": True}, "wrong_type"),
    ({**BASE, "propensity": 0}, "invalid_value"),
    ({**BASE, "timestamp": "yesterday"}, "invalid_value"),
    ({**BASE, "timestamp": "2026-01-01T00:00:00"}, "invalid_value"),  # no UTC offset
    ({**BASE, "timestamp": [1]}, "wrong_type"),
    (b'{"event_id":"e","experiment_id":"x","variant":"A","user_id":"u","timestamp":NaN}', "non_finite"),
    (b'{"event_id":"e","experiment_id":"x","variant":"A","user_id":"u","timestamp":1,"latency_ms":1e400}', "non_finite"),
    ({**BASE, "pad": "x" * 2000}, "oversize"),
])
def test_invocation_rejections_name_the_reason(payload, reason):
    assert reason_of("invocation", payload) == reason


def test_conversion_reward_must_be_a_finite_number():
    assert reason_of("conversion", {**BASE, "reward": "10"}) == "wrong_type"
    assert reason_of("conversion", orjson.dumps(BASE)[:-1] + b',"reward":-Infinity}') == "non_finite"
    assert parse_event("conversion", orjson.dumps({**BASE, "reward": -3.5})).reward == -3.5  # refunds are rewards too


def test_timestamps_rfc3339_and_epoch():
    assert parse_timestamp("2026-11-23T10:00:00Z") == parse_timestamp("2026-11-23T11:00:00+01:00") == 1795428000.0
    assert parse_timestamp(1795428000) == 1795428000.0
    with pytest.raises(InvalidEvent):
        parse_timestamp(-5)


def test_registry_and_clock_checks():
    limits = Limits(max_event_bytes=4096, max_lateness_seconds=3600, max_future_seconds=60)
    known = {"exp": frozenset({"A", "B"})}
    now = 1_700_000_000.0

    def check(**changes):
        raw = orjson.dumps({**BASE, "timestamp": now - 10, **changes})
        return validate(Record("t", 0, 0, "invocation", None, raw), known, now, limits)

    assert check().variant == "A"
    for changes, reason in [({"experiment_id": "other"}, "unknown_experiment"), ({"variant": "C"}, "unknown_variant"),
                            ({"timestamp": now + 61}, "timestamp_in_future"), ({"timestamp": now - 3601}, "too_late")]:
        with pytest.raises(InvalidEvent) as info:
            check(**changes)
        assert info.value.reason == reason
    with pytest.raises(InvalidEvent) as info:
        validate(Record("t", 0, 0, "invocation", None, None), known, now, limits)
    assert info.value.reason == "malformed_json"


def test_windows_are_aligned_to_the_epoch():
    assert window_start(0, 60) == 0
    assert window_start(59.999, 60) == 0
    assert window_start(60, 60) == 60
    assert window_start(1_700_000_123.4, 300) == 1_700_000_100


def test_aggregate_sums_per_window():
    events = [
        Invocation("1", "x", "A", "u", 10, latency_ms=5, error=True),
        Invocation("2", "x", "A", "u", 50, latency_ms=7),
        Invocation("3", "x", "A", "u", 70),
        Conversion("4", "x", "A", "u", 20, reward=3.0),
        Conversion("5", "x", "B", "u", 20, reward=2.0),
    ]
    totals = aggregate(events, 60)
    first = totals[("x", "A", 0)]
    assert (first.invocations, first.errors, first.conversions, first.reward_sum, first.reward_sq_sum) == (2, 1, 1, 3.0, 9.0)
    assert (first.latency.count, first.latency.ms_sum, sum(first.latency.hist)) == (2, 12.0, 2)
    assert totals[("x", "A", 60)].invocations == 1 and totals[("x", "A", 60)].latency.count == 0
    assert totals[("x", "B", 0)].reward_sum == 2.0


def test_latency_buckets_and_quantiles():
    assert LATENCY_BUCKETS == len(LATENCY_BUCKET_EDGES_MS) + 1
    assert list(LATENCY_BUCKET_EDGES_MS) == sorted(LATENCY_BUCKET_EDGES_MS)
    assert latency_bucket(0) == 0 and latency_bucket(1) == 0 and latency_bucket(1.0001) == 1
    assert latency_bucket(1e9) == LATENCY_BUCKETS - 1
    counts = [0] * LATENCY_BUCKETS
    for ms in [3] * 90 + [250] * 9 + [5000]:
        counts[latency_bucket(ms)] += 1
    assert histogram_quantile(counts, 0.5) == 3
    assert histogram_quantile(counts, 0.95) == 250
    assert histogram_quantile(counts, 1.0) == 5000
    assert histogram_quantile([0] * LATENCY_BUCKETS, 0.5) is None
    # Every edge is within one step (<= 33 %) of the next: quantiles are that precise.
    assert all(b / a <= 1.34 for a, b in zip(LATENCY_BUCKET_EDGES_MS[9:], LATENCY_BUCKET_EDGES_MS[10:]))


def test_config_accepts_the_seed_shape_and_names_bad_fields():
    config = load_config_text(
        "experiment_id: demo\nstrategy: EpsilonGreedy\nepsilon: 0.2\nwarmup: 100\n"
        "variants:\n  - {name: Champion, role: champion, initial_weight: 3}\n"
        "  - {name: Challenger1, role: challenger, initial_weight: 1, model_version: '2'}\n", "x.yaml")
    assert config.normalised_weights == {"Champion": 0.75, "Challenger1": 0.25}
    assert config.variants[1].model_version == "2"
    base = {"experiment_id": "e", "variants": [{"name": "A"}, {"name": "B"}]}
    assert [v.role for v in parse_config(base).variants] == ["champion", "challenger"]
    for bad, message in [
        ({**base, "epsilon": 2}, "epsilon must be in [0, 1]"),
        ({**base, "warmup": -1}, "warmup must be a whole number"),
        ({**base, "variants": [{"name": "A"}]}, "at least two variants"),
        ({**base, "variants": [{"name": "A"}, {"name": "A"}]}, "repeated: A"),
        ({**base, "variants": [{"name": "A", "role": "champion"}, {"name": "B", "role": "champion"}]}, "exactly one"),
        ({**base, "variants": [{"name": "A", "initial_weight": 0}, {"name": "B", "initial_weight": 0}]}, "not all be zero"),
        ({**base, "variants": [{"name": "A", "initial_weight": math.nan}, {"name": "B"}]}, "must be finite"),
        ({**base, "stratgy": "UCB1"}, "unknown keys: stratgy"),
        ({**base, "experiment_id": "has space"}, "experiment_id must match"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config(bad)
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_text("{", "bad.json")


def test_fast_path_agrees_with_the_full_rules():
    """The stream's fast path must accept exactly what the field-by-field rules accept, with the same event."""
    import random

    from producers.contracts import (
        _checked_conversion,
        _checked_invocation,
        conversion_from_dict,
        invocation_from_dict,
    )

    rng = random.Random(0)
    ids = ["a", "user-1", "", "x" * 256, "x" * 257, "tab\there", 7, None, True]
    numbers = [0, 1, 0.5, -1, 1.5, 1e308, math.inf, -math.inf, math.nan, True, "1", None, 1_700_000_000]
    stamps = numbers + ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "nope"]
    fields = {"event_id": ids, "experiment_id": ids, "variant": ids, "user_id": ids, "timestamp": stamps,
              "propensity": numbers, "latency_ms": numbers, "error": [True, False, None, 0, "no"],
              "model_version": ids, "reward": numbers, "invocation_id": ids}
    checks = 0
    for _ in range(20_000):
        data = {name: rng.choice(values) for name, values in fields.items() if rng.random() < 0.9}
        if rng.random() < 0.5:  # mostly-valid events exercise the fast path
            data.update(event_id="e", experiment_id="x", variant="A", user_id="u", timestamp=rng.choice([1, 2.5]))
        for fast, full in ((invocation_from_dict, _checked_invocation), (conversion_from_dict, _checked_conversion)):
            try:
                expected = full(data)
            except InvalidEvent as exc:
                with pytest.raises(InvalidEvent) as info:
                    fast(data)
                assert info.value.reason == exc.reason
            else:
                assert fast(data) == expected, data
                checks += 1
    assert checks > 2_000  # enough accepted events to mean something


@pytest.mark.parametrize("kind, changes, field", [
    ("conversion", {"reward": 1e12 + 1}, "reward"),
    ("conversion", {"reward": -1e308}, "reward"),
    ("conversion", {"values": {"revenue": 2e12}}, "values.revenue"),
    ("invocation", {"values": {"score": -1e300}}, "values.score"),
    ("invocation", {"latency_ms": 86_400_001}, "latency_ms"),
])
def test_numbers_beyond_the_bounds_are_out_of_range(kind, changes, field):
    with pytest.raises(InvalidEvent) as info:
        parse_event(kind, orjson.dumps({**BASE, **changes}))
    assert (info.value.reason, info.value.field) == ("out_of_range", field)
    at_the_bound = {"reward": 1e12, "values": {"revenue": -1e12}, "latency_ms": 86_400_000}
    assert parse_event("conversion", orjson.dumps({**BASE, "reward": at_the_bound["reward"]})).reward == 1e12
    assert parse_event("invocation", orjson.dumps({**BASE, "latency_ms": 86_400_000})).latency_ms == 86_400_000


@pytest.mark.parametrize("kind, field", [
    ("conversion", "reward"), ("invocation", "propensity"), ("invocation", "latency_ms"),
])
def test_an_explicit_null_number_is_refused_not_read_as_absent(kind, field):
    """orjson and JavaScript write NaN as null: a null reward must not become a success with reward 1.0."""
    with pytest.raises(InvalidEvent) as info:
        parse_event(kind, orjson.dumps({**BASE, field: None}))
    assert (info.value.reason, info.value.field) == ("wrong_type", field) and "null" in info.value.detail
    with pytest.raises(InvalidEvent) as info:
        parse_event(kind, orjson.dumps({**BASE, "values": {"revenue": None}}))
    assert info.value.field == "values.revenue"
    # Null identifiers and flags mean absent: they cannot be mistaken for a number.
    event = parse_event(kind, orjson.dumps({**BASE, "model_version": None, "invocation_id": None, "error": None}))
    assert getattr(event, "model_version", None) is None and getattr(event, "invocation_id", None) is None


@pytest.mark.parametrize("event, field, reason", [
    (Conversion("e3", "x", "A", "u1", 1.7e9, reward=float("-inf")), "reward", "non_finite"),
    (Conversion("e3", "x", "A", "u1", 1.7e9, reward=float("nan")), "reward", "non_finite"),
    (Conversion("e3", "x", "A", "u1", 1.7e9, values={"revenue": float("nan")}), "values.revenue", "non_finite"),
    (Conversion("e3", "x", "A", "u1", 1.7e9, reward=1e308), "reward", "out_of_range"),
    (Invocation("e3", "x", "A", "u1", 1.7e9, propensity=float("nan")), "propensity", "non_finite"),
    (Invocation("e3", "x", "A", "u1", 1.7e9, latency_ms=float("inf")), "latency_ms", "non_finite"),
    (Invocation("e3", "x", "A", "u1\n", 1.7e9), "user_id", "invalid_value"),
])
def test_encode_refuses_what_the_stream_would_refuse_naming_the_field(event, field, reason):
    with pytest.raises(InvalidEvent) as info:
        encode(event)
    assert (info.value.field, info.value.reason) == (field, reason)
