"""The event contracts (topics ``abflow.invocations``, ``abflow.conversions``, ``abflow.shadows``) and their validation.

Pure functions, no I/O. The stream job and the publisher both validate with
``parse_event``; a failure is an ``InvalidEvent`` whose ``reason`` is one of
``REASONS`` (a stable code operators count by) and whose ``detail`` names the
field and the problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from datetime import datetime

import orjson

from abflow.core.config import UNIT_VARIABLES, VALUE_NAME
from abflow.core.errors import Invalid

INVOCATION = "invocation"
CONVERSION = "conversion"
SHADOW = "shadow"
KINDS = (INVOCATION, CONVERSION, SHADOW)

MAX_ID_LENGTH = 256
MAX_VALUES = 32  # named numeric values per event
# Bounds of the numbers an event carries. Far beyond any real reward, revenue or score, and small
# enough that the sums the stream keeps (Σy², Σxy over billions of events) stay finite in PostgreSQL's
# double precision: 1e12² × 1e9 events = 1e33, against a maximum of about 1.8e308.
MAX_ABS_VALUE = 1e12  # |reward| and every entry of ``values``
MAX_LATENCY_MS = 86_400_000.0  # one day: a latency beyond that is a broken clock, not a slow model

# Stable reason codes of dead letters.
REASONS = (
    "oversize",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "non_finite",
    "out_of_range",
    "unknown_experiment",
    "unknown_variant",
    "timestamp_in_future",
    "too_late",
    "refused_by_database",  # valid by the contract, refused by PostgreSQL (the stream's dead letters only)
)


class InvalidEvent(Invalid):
    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field = field


@dataclass(slots=True)
class Invocation:
    event_id: str
    experiment_id: str
    variant: str
    user_id: str
    timestamp: float  # epoch seconds
    propensity: float | None = None
    latency_ms: float | None = None
    error: bool = False
    model_version: str | None = None
    # Named numbers the metrics of the experiment can use (e.g. correct, labelled, confidence).
    values: dict[str, float] | None = None

    kind = INVOCATION

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(slots=True)
class Conversion:
    event_id: str
    experiment_id: str
    variant: str
    user_id: str
    timestamp: float  # epoch seconds
    reward: float = 1.0
    invocation_id: str | None = None
    values: dict[str, float] | None = None  # e.g. revenue, tp, fp, fn

    kind = CONVERSION

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(slots=True)
class Shadow:
    """One request answered by the served variant and, unseen by the user, by a shadow variant.

    ``agree`` says whether the two answers matched (None when either side failed);
    the predictions are logged for offline comparison and not aggregated.
    """

    event_id: str
    experiment_id: str
    variant: str  # the shadow
    served_variant: str
    user_id: str
    timestamp: float  # epoch seconds
    latency_ms: float | None = None
    error: bool = False
    served_latency_ms: float | None = None
    served_error: bool = False
    agree: bool | None = None
    prediction: object = None
    served_prediction: object = None

    kind = SHADOW

    def to_dict(self) -> dict:
        return _to_dict(self)


Event = Invocation | Conversion | Shadow
_FIELD_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in (Invocation, Conversion, Shadow)}


def _to_dict(event: Event) -> dict:
    """The event's JSON object: its fields, leaving out optional ones that are unset."""
    return {name: value for name in _FIELD_NAMES[type(event)] if (value := getattr(event, name)) is not None}


def encode(event: Event) -> bytes:
    """The event's JSON bytes, after the checks the stream applies to the fields (``InvalidEvent``
    naming the field otherwise): nothing the stream would refuse, or read otherwise than meant,
    leaves the publisher. (orjson writes NaN and Infinity as null.)"""
    data = event.to_dict()
    _FROM_DICT[event.kind](data)
    return orjson.dumps(data)


def _identifier(data: dict, field: str, required: bool = True) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"'{field}' is required", field)
        return None
    if type(value) is not str:
        raise InvalidEvent("wrong_type", f"'{field}' must be a string, got {type(value).__name__}", field)
    if not value or len(value) > MAX_ID_LENGTH:
        raise InvalidEvent("invalid_value", f"'{field}' must have 1 to {MAX_ID_LENGTH} characters", field)
    if not value.isprintable():
        raise InvalidEvent("invalid_value", f"'{field}' must not contain control characters", field)
    return value


def _number(data: dict, field: str, bound: float = MAX_ABS_VALUE) -> float | None:
    """An optional number: absent is None; present, it must be a finite number with |value| <= ``bound``.

    An explicit ``null`` is refused, not read as absent: JSON encoders (orjson, JavaScript's
    JSON.stringify) write NaN and Infinity as null, and a conversion whose NaN reward became
    "absent" would count as a success with the default reward."""
    if field not in data:
        return None
    return _bounded(field, data[field], bound)


def _bounded(field: str, value, bound: float) -> float:
    if value is None:
        raise InvalidEvent("wrong_type", f"'{field}' is null: leave the field out instead (NaN and Infinity "
                                         "become null in many JSON encoders)", field)
    if type(value) not in (int, float):  # bool is an int subclass, and not a number here
        raise InvalidEvent("wrong_type", f"'{field}' must be a number, got {type(value).__name__}", field)
    value = float(value)
    if not math.isfinite(value):
        raise InvalidEvent("non_finite", f"'{field}' must be finite", field)
    if abs(value) > bound:
        raise InvalidEvent("out_of_range", f"'{field}' must be within ±{bound:g}, got {value:g}", field)
    return value


def parse_timestamp(value: object) -> float:
    """Epoch seconds from an RFC 3339 string (with an offset) or a number of epoch seconds."""
    if value is None:
        raise InvalidEvent("missing_field", "'timestamp' is required", "timestamp")
    if type(value) in (int, float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise InvalidEvent("non_finite", "'timestamp' must be finite", "timestamp")
        if seconds < 0:
            raise InvalidEvent("invalid_value", "'timestamp' must not be before 1970", "timestamp")
        return seconds
    if type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent("invalid_value", f"'timestamp' is not RFC 3339: {value[:64]!r}", "timestamp") from None
        if parsed.tzinfo is None:
            raise InvalidEvent("invalid_value", "'timestamp' needs a UTC offset (e.g. 'Z' or '+00:00')", "timestamp")
        return parsed.timestamp()
    raise InvalidEvent("wrong_type", f"'timestamp' must be an RFC 3339 string or epoch seconds, got {type(value).__name__}",
                       "timestamp")


def check_clock(timestamp: float, now: float, max_future_seconds: float, max_lateness_seconds: float) -> None:
    """``InvalidEvent`` when an event's time is more than ``max_future_seconds`` ahead of ``now`` or
    older than ``max_lateness_seconds`` (the stream's limits; the HTTP API applies the same)."""
    if timestamp > now + max_future_seconds:
        raise InvalidEvent("timestamp_in_future", f"timestamp is {timestamp - now:.0f}s ahead of the clock; at most "
                           f"{max_future_seconds:.0f}s are allowed", "timestamp")
    if timestamp < now - max_lateness_seconds:
        raise InvalidEvent("too_late", f"timestamp is {now - timestamp:.0f}s old; the maximum lateness is "
                           f"{max_lateness_seconds:.0f}s", "timestamp")


class _NonFinite(Exception):
    pass


def _reject_constant(name: str):
    raise _NonFinite(name)


def _has_non_finite_number(raw: bytes) -> bool:
    """Whether JSON that orjson refused is only wrong for NaN/Infinity (which Python's json writes)."""
    try:
        json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonFinite:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _decode(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise InvalidEvent("oversize", f"payload is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if _has_non_finite_number(raw):
            raise InvalidEvent("non_finite", "numbers must be finite (NaN, Infinity or an overflowing number found)") from None
        raise InvalidEvent("malformed_json", str(exc)[:200]) from None
    if type(data) is not dict:
        raise InvalidEvent("not_an_object", f"the event must be a JSON object, got {type(data).__name__}")
    return data


def _checked_invocation(data: dict) -> Invocation:
    """The full rules, field by field, with an error that names the field."""
    propensity = _number(data, "propensity")
    if propensity is not None and not 0.0 < propensity <= 1.0:
        raise InvalidEvent("invalid_value", f"'propensity' must be in (0, 1], got {propensity}", "propensity")
    latency_ms = _latency(data, "latency_ms")
    error = _flag(data, "error", False)
    return Invocation(
        event_id=_identifier(data, "event_id"),
        experiment_id=_identifier(data, "experiment_id"),
        variant=_identifier(data, "variant"),
        user_id=_identifier(data, "user_id"),
        timestamp=parse_timestamp(data.get("timestamp")),
        propensity=propensity,
        latency_ms=latency_ms,
        error=error,
        model_version=_identifier(data, "model_version", required=False),
        values=_values(data),
    )


def _values(data: dict) -> dict[str, float] | None:
    values = data.get("values")
    if values is None:
        return None
    if type(values) is not dict:
        raise InvalidEvent("wrong_type", f"'values' must be an object of named numbers, got {type(values).__name__}", "values")
    if len(values) > MAX_VALUES:
        raise InvalidEvent("invalid_value", f"'values' may hold at most {MAX_VALUES} numbers, got {len(values)}", "values")
    checked = {}
    for name, value in values.items():
        if not VALUE_NAME.match(name) or name in UNIT_VARIABLES:
            raise InvalidEvent("invalid_value", f"'values': {name!r} is not a value name (lower case letters, digits and "
                               f"_, starting with a letter; not one of {', '.join(UNIT_VARIABLES)})", "values")
        checked[name] = _bounded(f"values.{name}", value, MAX_ABS_VALUE)
    return checked


def _flag(data: dict, field: str, default: bool | None) -> bool | None:
    value = data.get(field)
    if value is None:
        return default
    if type(value) is not bool:
        raise InvalidEvent("wrong_type", f"'{field}' must be true or false, got {type(value).__name__}", field)
    return value


def _latency(data: dict, field: str) -> float | None:
    value = _number(data, field, MAX_LATENCY_MS)
    if value is not None and value < 0:
        raise InvalidEvent("invalid_value", f"'{field}' must be >= 0, got {value}", field)
    return value


def shadow_from_dict(data: dict) -> Shadow:
    error, served_error = _flag(data, "error", False), _flag(data, "served_error", False)
    agree = _flag(data, "agree", None)
    if agree is not None and (error or served_error):
        raise InvalidEvent("invalid_value", "'agree' must be absent when either side failed", "agree")
    return Shadow(
        event_id=_identifier(data, "event_id"),
        experiment_id=_identifier(data, "experiment_id"),
        variant=_identifier(data, "variant"),
        served_variant=_identifier(data, "served_variant"),
        user_id=_identifier(data, "user_id"),
        timestamp=parse_timestamp(data.get("timestamp")),
        latency_ms=_latency(data, "latency_ms"),
        error=error,
        served_latency_ms=_latency(data, "served_latency_ms"),
        served_error=served_error,
        agree=agree,
        prediction=data.get("prediction"),
        served_prediction=data.get("served_prediction"),
    )


def _checked_conversion(data: dict) -> Conversion:
    reward = _number(data, "reward")
    return Conversion(
        event_id=_identifier(data, "event_id"),
        experiment_id=_identifier(data, "experiment_id"),
        variant=_identifier(data, "variant"),
        user_id=_identifier(data, "user_id"),
        timestamp=parse_timestamp(data.get("timestamp")),
        reward=1.0 if reward is None else reward,
        invocation_id=_identifier(data, "invocation_id", required=False),
        values=_values(data),
    )


# The stream validates every event, so the common case takes a fast path: one
# expression that accepts only what the full rules accept, with the same result;
# anything else (ISO timestamps, optional oddities, errors) goes through the full
# rules, which explain what is wrong. tests/test_contracts.py checks they agree.
_NUMBER = (int, float)
_INF = math.inf
_ABSENT = object()  # an optional field left out (an explicit null is not absent: see _number)


def _is_id(value) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable()


def invocation_from_dict(data: dict) -> Invocation:
    get = data.get
    event_id, experiment_id, variant, user_id = get("event_id"), get("experiment_id"), get("variant"), get("user_id")
    timestamp, propensity, latency_ms = get("timestamp"), get("propensity", _ABSENT), get("latency_ms", _ABSENT)
    error, model_version = get("error", False), get("model_version")
    if (
        _is_id(event_id) and _is_id(experiment_id) and _is_id(variant) and _is_id(user_id)
        and type(timestamp) in _NUMBER and 0 <= timestamp < _INF
        and (propensity is _ABSENT or (type(propensity) in _NUMBER and 0 < propensity <= 1))
        and (latency_ms is _ABSENT or (type(latency_ms) in _NUMBER and 0 <= latency_ms <= MAX_LATENCY_MS))
        and type(error) is bool
        and (model_version is None or _is_id(model_version))
        and "values" not in data
    ):
        return Invocation(event_id, experiment_id, variant, user_id, float(timestamp),
                          None if propensity is _ABSENT else float(propensity),
                          None if latency_ms is _ABSENT else float(latency_ms), error, model_version)
    return _checked_invocation(data)


def conversion_from_dict(data: dict) -> Conversion:
    get = data.get
    event_id, experiment_id, variant, user_id = get("event_id"), get("experiment_id"), get("variant"), get("user_id")
    timestamp, reward, invocation_id = get("timestamp"), get("reward", 1.0), get("invocation_id")
    if (
        _is_id(event_id) and _is_id(experiment_id) and _is_id(variant) and _is_id(user_id)
        and type(timestamp) in _NUMBER and 0 <= timestamp < _INF
        and type(reward) in _NUMBER and -MAX_ABS_VALUE <= reward <= MAX_ABS_VALUE
        and (invocation_id is None or _is_id(invocation_id))
        and "values" not in data
    ):
        return Conversion(event_id, experiment_id, variant, user_id, float(timestamp),
                          float(reward), invocation_id)
    return _checked_conversion(data)


_FROM_DICT = {INVOCATION: invocation_from_dict, CONVERSION: conversion_from_dict, SHADOW: shadow_from_dict}


def parse_event(kind: str, raw: bytes, max_bytes: int = 64 * 1024) -> Event:
    """Decode and validate one event of ``kind``; raise ``InvalidEvent`` when it breaks the contract."""
    return _FROM_DICT[kind](_decode(raw, max_bytes))


def event_from_dict(kind: str, data: dict) -> Event:
    return _FROM_DICT[kind](data)
