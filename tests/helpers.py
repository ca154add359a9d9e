"""Test helpers: experiments, publishing, and expected aggregates computed the plain way."""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from datetime import datetime

import orjson
from sqlalchemy import text

from abflow.core.config import parse_config
from producers.publisher import Publisher
from storage.registry import create_experiment

WINDOW = 60


def make_experiment(engine, variants=("Champion", "Challenger"), prefix="exp", metric_window: int | None = None) -> str:
    """An experiment; with ``metric_window`` (seconds), its metrics also read every stream variable
    within that window of exposure (so the stream keeps those windowed sums too)."""
    experiment_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    config = {
        "experiment_id": experiment_id,
        "strategy": "ThompsonSampling",
        "variants": [{"name": name, "initial_weight": 1.0} for name in variants],
    }
    if metric_window is not None:
        config["metrics"] = [
            {"name": "converted_units", "role": "primary", "attribution_window_seconds": metric_window},
            {"name": "reward_per_unit", "role": "secondary", "attribution_window_seconds": metric_window},
            {"name": "error_rate", "role": "guardrail", "attribution_window_seconds": metric_window}]
    create_experiment(engine, parse_config(config))
    return experiment_id


def invocation(experiment_id, variant, ts, user=None, latency_ms=None, error=False, event_id=None) -> dict:
    event = {
        "event_id": event_id or str(uuid.uuid4()),
        "experiment_id": experiment_id,
        "variant": variant,
        "user_id": user or f"u{random.randrange(10_000)}",
        "timestamp": ts,
        "error": error,
    }
    if latency_ms is not None:
        event["latency_ms"] = latency_ms
    return event


def conversion(experiment_id, variant, ts, user=None, reward=1.0, event_id=None) -> dict:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "experiment_id": experiment_id,
        "variant": variant,
        "user_id": user or f"u{random.randrange(10_000)}",
        "timestamp": ts,
        "reward": reward,
    }


def publish(publisher: Publisher, kind: str, event: dict | bytes, key: str | None = None) -> None:
    topic = publisher.topics.invocations if kind == "invocation" else publisher.topics.conversions
    value = event if isinstance(event, bytes) else orjson.dumps(event)
    if key is None and isinstance(event, dict):
        key = event.get("user_id")
    publisher.produce(topic, value, key=key)


class Expected:
    """Aggregates computed the plain way from the unique valid events a test published."""

    def __init__(self) -> None:
        self.windows = defaultdict(lambda: defaultdict(float))
        self._seen: set[tuple[str, str]] = set()
        self._unique: list[tuple[str, dict, float]] = []  # in publish order, with epoch timestamps

    def add(self, kind: str, event: dict) -> None:
        if (kind, event["event_id"]) in self._seen:
            return
        self._seen.add((kind, event["event_id"]))
        ts = event["timestamp"]
        if isinstance(ts, str):
            ts = datetime.fromisoformat(ts).timestamp()
        self._unique.append((kind, event, ts))
        start = int(ts // WINDOW) * WINDOW
        row = self.windows[(event["experiment_id"], event["variant"], start)]
        if kind == "invocation":
            row["invocations"] += 1
            row["errors"] += int(event.get("error", False))
            if event.get("latency_ms") is not None:
                row["latency_count"] += 1
                row["latency_ms_sum"] += event["latency_ms"]
        else:
            reward = event.get("reward", 1.0)
            row["conversions"] += 1
            row["reward_sum"] += reward
            row["reward_sq_sum"] += reward * reward

    def totals(self) -> dict[tuple[str, str], dict[str, float]]:
        out = defaultdict(lambda: defaultdict(float))
        for (experiment_id, variant, _), row in self.windows.items():
            for column, value in row.items():
                out[(experiment_id, variant)][column] += value
        return out

    @property
    def events(self) -> int:
        return len(self._seen)

    def unit_moments(self, attribution_seconds: float = 24 * 3600) -> dict[tuple[str, str], tuple]:
        """Per (experiment, variant): (units, sums, products), the plain way. A unit's
        exposure is its first invocation published (a user's invocations keep their order on their
        partition); every event of the unit within the attribution window counts for it, conversions
        published before the exposure included; a unit never exposed counts nowhere."""
        exposure: dict[tuple[str, str], tuple[str, float]] = {}
        for kind, event, ts in self._unique:
            key = (event["experiment_id"], event["user_id"])
            if kind == "invocation" and key not in exposure:
                exposure[key] = (event["variant"], ts)
        values: dict[tuple[str, str], list[float]] = {key: [0.0] * 5 for key in exposure}
        for kind, event, ts in self._unique:
            key = (event["experiment_id"], event["user_id"])
            if key not in exposure or ts > exposure[key][1] + attribution_seconds:
                continue
            v = values[key]
            if kind == "invocation":
                v[0] += 1
                v[3] += bool(event.get("error", False))
            else:
                v[1] += 1
                v[2] += event.get("reward", 1.0)
                v[4] = 1.0
        cells: dict[tuple[str, str], list] = {}
        for key, (variant, _) in exposure.items():
            v = values[key]
            cell = cells.setdefault((key[0], variant), [0, [0.0] * 5, [0.0] * 15])
            cell[0] += 1
            for i in range(5):
                cell[1][i] += v[i]
            pairs = [(i, j) for i in range(5) for j in range(i, 5)]
            for p, (i, j) in enumerate(pairs):
                cell[2][p] += v[i] * v[j]
        return {key: tuple(cell) for key, cell in cells.items()}


COLUMNS = ["invocations", "conversions", "reward_sum", "reward_sq_sum", "errors", "latency_count", "latency_ms_sum"]


def read_windows(engine, experiment_ids) -> dict:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT experiment_id, variant, extract(epoch FROM window_start)::bigint AS start, "
            + ", ".join(COLUMNS) + " FROM variant_windows WHERE experiment_id = ANY(:ids)"
        ), {"ids": list(experiment_ids)})
        return {(r.experiment_id, r.variant, r.start): {c: getattr(r, c) for c in COLUMNS} for r in rows}


def read_totals(engine, experiment_ids) -> dict:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT experiment_id, variant, invocations, conversions, reward_sum, reward_sq_sum, errors "
            "FROM variant_totals WHERE experiment_id = ANY(:ids)"
        ), {"ids": list(experiment_ids)})
        return {(r.experiment_id, r.variant): dict(r._mapping) for r in rows}


def counted_events(engine, experiment_ids) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows WHERE experiment_id = ANY(:ids)"
        ), {"ids": list(experiment_ids)}).scalar_one())


def assert_windows_match(engine, expected: Expected) -> None:
    experiment_ids = {key[0] for key in expected.windows}
    actual = read_windows(engine, experiment_ids)
    assert set(actual) == set(expected.windows), "windows differ"
    for key, row in expected.windows.items():
        for column in COLUMNS:
            want = row.get(column, 0)
            got = actual[key][column]
            if isinstance(got, float):
                assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (key, column, got, want)
            else:
                assert got == want, (key, column, got, want)


def read_unit_moments(engine, experiment_ids, window: int | None = None) -> dict:
    """The units' moments as the report reads them (storage.units.unit_moments): the sums of the stream's
    variables (over the events within ``window`` seconds of exposure, when given) and of each product of two."""
    from abflow.core.config import windowed
    from bandit_service.report.evidence import BASE_VARIABLES
    from storage.units import read_units

    variables = BASE_VARIABLES if window is None else {
        name: (tuple((windowed(term, window), c) for term, c in terms), indicator, cap)
        for name, (terms, indicator, cap) in BASE_VARIABLES.items()}
    names = list(variables)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i:]]
    found = {}
    for experiment_id in experiment_ids:
        rows, _, _ = read_units(engine, experiment_id, variables, pairs, [], [])
        for variant, _, units, _, *moments in rows:
            found[(experiment_id, variant)] = (units, list(moments[:5]), list(moments[5:]))
    return found


def assert_units_match(engine, expected: Expected, metric_window: int | None = None) -> None:
    """Every unit-level moment equals the plain recount: no unit, value or product lost or counted twice
    (nor any of the sums within ``metric_window`` seconds of exposure, when given)."""
    for window in (None,) if metric_window is None else (None, metric_window):
        want = expected.unit_moments() if window is None else expected.unit_moments(window)
        got = read_unit_moments(engine, {key[0] for key in expected.windows}, window)
        assert set(got) == set(want), (sorted(set(want) - set(got))[:5],
                                       [(k, got[k]) for k in sorted(set(got) - set(want))[:3]])
        for key, (units, sums, products) in want.items():
            assert got[key][0] == units, (key, got[key][0], units)
            for name, have, should in (("sums", got[key][1], sums), ("products", got[key][2], products)):
                for i, (a, b) in enumerate(zip(have, should)):
                    assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (window, key, name, i, a, b)
    want = expected.unit_moments()
    # The bandits' input: the attributed events per variant of exposure.
    totals: dict[tuple[str, str], list[float]] = {}
    for (experiment_id, variant), (_, sums, _) in want.items():
        row = totals.setdefault((experiment_id, variant), [0.0, 0.0, 0.0])
        for i in range(3):
            row[i] += sums[i]
    with engine.connect() as conn:
        stored = {(e, v): [float(n), float(c), float(r)] for e, v, n, c, r in conn.execute(text(
            "SELECT experiment_id, variant, invocations, conversions, reward_sum FROM attributed_totals "
            "WHERE experiment_id = ANY(:ids)"), {"ids": sorted({key[0] for key in want})})}
    assert set(stored) == set(totals)
    for key, row in totals.items():
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(stored[key], row)), (key, stored[key], row)


def now() -> float:
    return time.time()


def stream_counters(engine, topics) -> dict[str, int]:
    """counted, duplicates and dead_letters summed over ``topics``."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT coalesce(sum(counted), 0), coalesce(sum(duplicates), 0), coalesce(sum(dead_letters), 0) "
            "FROM stream_counters WHERE topic = ANY(:topics)"
        ), {"topics": list(topics)}).one()
    return {"counted": int(row[0]), "duplicates": int(row[1]), "dead_letters": int(row[2])}


class Assigner:
    """``bandit_service.assignment.assign`` on an asynchronous connection of its own (what the API
    uses), called synchronously: ``assigner(experiment_id, unit_id)``."""

    def __init__(self, database_url: str):
        import asyncio

        import psycopg

        from abflow.settings import libpq_url

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(psycopg.AsyncConnection.connect(libpq_url(database_url),
                                                                                 autocommit=True))

    def __call__(self, experiment_id: str, unit_id: str):
        from bandit_service.assignment import assign

        return self.loop.run_until_complete(assign(self.conn, experiment_id, unit_id))

    def __enter__(self) -> "Assigner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()
