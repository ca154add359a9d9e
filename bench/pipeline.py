"""Benchmark of the streaming spine: throughput against a plain consumer, and freshness.

    python bench/pipeline.py [--events 1000000] [--rate 5000] [--seconds 30] [--history 0]

(a) Throughput. Publishes ``--events`` events, then measures, in the same run
and on the same records: a plain confluent-kafka consumer that parses (orjson)
and aggregates per (experiment, variant, window) in a dict (the baseline), and
`abflow worker` until `variant_totals` holds every event. Prints events/s and
the ratio worker / baseline; then the floor of keeping a row per unit in
PostgreSQL (a COPY and a bare upsert of each batch's units, nothing else) on
the same units, as a ratio to the same baseline.

With ``--refused N`` the run also carries N invocations, spread evenly through it, that
PostgreSQL refuses (a CHECK constraint on their units' rows): each batch holding one is applied in
halves until the record stands alone and goes to the dead letters. It prints the worker's rate
with that path taken N times; compare with a run without it, in the same hour.

With ``--history N`` the database first holds what earlier experiments left: N units with their
assignments and N/5 outcomes still waiting for an exposure, of another experiment (a deployment
that has run for a while). The worker's cost should follow its batches, not those tables.

(b) Freshness. With a worker running, publishes at a steady ``--rate`` for
``--seconds`` and polls PostgreSQL every 10 ms; the delay of the k-th event is
the first time the counted total reached k minus the k-th event's publish
time. Prints p50/p95/p99.

Uses ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL when set, else starts the
embedded broker and PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import psycopg
from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Stack, add_broker_option, save_results  # noqa: E402

from abflow.core.config import parse_config  # noqa: E402
from abflow.settings import Settings, Topics, libpq_url  # noqa: E402
from producers.contracts import Conversion, Invocation, encode  # noqa: E402
from producers.publisher import Publisher, ensure_topics  # noqa: E402
from storage.registry import create_experiment  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_payloads(experiment_id: str, count: int, seed: int, start: float, span: float, users: int
                  ) -> list[tuple[str, bytes, bytes]]:
    """(kind, key, value) of ``count`` events from ``users`` possible units: 90 % invocations, 10 % conversions."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        user = f"user-{rng.randrange(users)}"
        variant = "Champion" if rng.random() < 0.5 else "Challenger"
        ts = start + span * i / count
        if rng.random() < 0.9:
            event = Invocation(f"{seed}-{i}", experiment_id, variant, user, ts, 0.5, round(rng.uniform(5, 200), 2),
                               rng.random() < 0.01, "v1")
            out.append(("invocation", user.encode(), encode(event)))
        else:
            event = Conversion(f"{seed}-{i}", experiment_id, variant, user, ts, 1.0)
            out.append(("conversion", user.encode(), encode(event)))
    return out


def publish(publisher: Publisher, payloads) -> None:
    topics = publisher.topics
    for kind, key, value in payloads:
        publisher.produce(topics.invocations if kind == "invocation" else topics.conversions, value, key=key)
    publisher.flush(300)


def plain_consumer_baseline(bootstrap: str, topics: Topics, partitions: int, total: int, window: int) -> float:
    """Seconds for confluent-kafka consume + orjson + dict aggregation of every record."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-baseline-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(t, p, 0) for t in (topics.invocations, topics.conversions) for p in range(partitions)])
    sums: dict = defaultdict(lambda: [0, 0, 0.0])
    seen = 0
    started = time.perf_counter()
    while seen < total:
        for message in consumer.consume(10_000, 1.0):
            if message.error():
                continue
            event = orjson.loads(message.value())
            row = sums[(event["experiment_id"], event["variant"], int(event["timestamp"] // window) * window)]
            if "reward" in event:
                row[1] += 1
                row[2] += event["reward"]
            else:
                row[0] += 1
            seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    assert sum(r[0] + r[1] for r in sums.values()) == total
    return elapsed


def counted(conn, experiment_id: str) -> int:
    return int(conn.execute(
        "SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows WHERE experiment_id = %s",
        (experiment_id,)).fetchone()[0])


def start_worker(env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abflow.cli", "worker"], env=env, cwd=ROOT,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_worker(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def run_env(base: dict, bootstrap: str, database_url: str, home: Path, tag: str, partitions: int) -> tuple[dict, Topics]:
    env = {**base, "ABFLOW_KAFKA_BOOTSTRAP": bootstrap, "ABFLOW_DATABASE_URL": database_url, "ABFLOW_HOME": str(home),
           "ABFLOW_TOPIC_INVOCATIONS": f"bench-{tag}.invocations", "ABFLOW_TOPIC_CONVERSIONS": f"bench-{tag}.conversions",
           "ABFLOW_TOPIC_DEAD_LETTERS": f"bench-{tag}.dead-letters", "ABFLOW_TOPIC_ALLOCATIONS": f"bench-{tag}.allocations",
           "ABFLOW_TOPIC_SHADOWS": f"bench-{tag}.shadows",
           "ABFLOW_CONSUMER_GROUP": f"bench-{tag}", "ABFLOW_PARTITIONS": str(partitions),
           "ABFLOW_KAFKA_SESSION_TIMEOUT_SECONDS": "3"}
    topics = Topics(env["ABFLOW_TOPIC_INVOCATIONS"], env["ABFLOW_TOPIC_CONVERSIONS"],
                    env["ABFLOW_TOPIC_DEAD_LETTERS"], env["ABFLOW_TOPIC_ALLOCATIONS"], env["ABFLOW_TOPIC_SHADOWS"])
    return env, topics


def new_experiment(engine, tag: str) -> str:
    experiment_id = f"bench-{tag}"
    create_experiment(engine, parse_config({"experiment_id": experiment_id, "strategy": "WeightedSampling",
                                            "variants": [{"name": "Champion"}, {"name": "Challenger"}]}))
    return experiment_id


def refused_dead_letters(conn, topic: str) -> int:
    return int(conn.execute("SELECT coalesce(sum(count), 0) FROM dead_letter_counts WHERE topic = %s "
                            "AND reason = 'refused_by_database'", (topic,)).fetchone()[0])


def refuse(engine, experiment_id: str) -> None:
    """PostgreSQL refuses the unit rows of this experiment's units named refused-*."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE unit_state ADD CONSTRAINT \"refuse_{experiment_id}\" CHECK "
                          f"(experiment_id <> '{experiment_id}' OR unit_id NOT LIKE 'refused-%') NOT VALID"))


def add_history(engine, database_url: str, units: int) -> None:
    """Rows an earlier, finished experiment left: ``units`` exposed units and their assignments, and
    ``units // 5`` outcomes held for units never exposed."""
    old = new_experiment(engine, f"history-{uuid.uuid4().hex[:6]}")
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("INSERT INTO assignments (experiment_id, unit_id, variant, propensity) "
                     "SELECT %s, 'user-' || g, 'Champion', 0.5 FROM generate_series(1, %s) g", (old, units))
        conn.execute("INSERT INTO unit_state (experiment_id, unit_id, variant, exposed_at, propensity, multiple, "
                     "invocations, conversions, reward, errors, value_sums) "
                     "SELECT %s, 'user-' || g, 'Champion', 0, 0.5, false, 1, 0, 0, 0, '{}' FROM generate_series(1, %s) g",
                     (old, units))
        conn.execute("INSERT INTO held_outcomes (experiment_id, unit_id, variant, ts, reward, attribution_seconds, held_at) "
                     "SELECT %s, 'held-' || g, 'Champion', 0, 1, 86400, extract(epoch FROM now()) "
                     "FROM generate_series(1, %s) g", (old, units // 5))
        conn.commit()
        conn.execute("ANALYZE assignments, unit_state, held_outcomes")


def throughput(args, bootstrap, database_url, home, engine) -> dict:
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, bootstrap, database_url, home, tag, args.partitions)
    ensure_topics(bootstrap, topics, args.partitions)
    if args.history:
        log(f"(a) history: {args.history:,} units and assignments and {args.history // 5:,} held outcomes "
            "of an earlier experiment…")
        add_history(engine, database_url, args.history)
    experiment_id = new_experiment(engine, tag)
    log(f"(a) generating and publishing {args.events:,} events…")
    payloads = make_payloads(experiment_id, args.events, 1, time.time() - 3600, 3000, args.users)
    distinct_units = len({key for _, key, _ in payloads})
    if args.refused:
        refuse(engine, experiment_id)
        for k in range(args.refused):
            unit = f"refused-{k}"
            event = Invocation(f"refused-{k}", experiment_id, "Champion", unit, time.time() - 1800)
            payloads.insert((k + 1) * len(payloads) // (args.refused + 1), ("invocation", unit.encode(), encode(event)))
    started = time.perf_counter()
    with Publisher(bootstrap, topics) as publisher:
        publish(publisher, payloads)
    publish_rate = args.events / (time.perf_counter() - started)
    unit_batches = [sorted({key.decode() for _, key, _ in payloads[i:i + FLOOR_BATCH]})
                    for i in range(0, len(payloads), FLOOR_BATCH)]
    del payloads
    log("(a) baseline: plain confluent-kafka consume + orjson + dict aggregation…")
    baseline_s = plain_consumer_baseline(bootstrap, topics, args.partitions, args.events, 60)
    log(f"    {args.events / baseline_s:,.0f} events/s")
    log("(a) abflow worker until variant_totals holds every event…")
    worker = start_worker(env, home / f"worker-{tag}.log")
    first_at = None
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            n = counted(conn, experiment_id)
            now = time.perf_counter()
            if n and first_at is None:
                first_at, first_n = now, n
            if n >= args.events:
                done_at = now
                break
            if worker.poll() is not None:
                raise SystemExit(f"worker exited; see {home}/worker-{tag}.log")
            time.sleep(0.05)
        units, unit_events = conn.execute(
            "SELECT count(*), coalesce(sum(invocations + conversions), 0) FROM unit_state WHERE experiment_id = %s",
            (experiment_id,)).fetchone()
        deadline = time.monotonic() + 60
        while (dead := refused_dead_letters(conn, topics.invocations)) < args.refused \
                and time.monotonic() < deadline:  # the refused records after the last counted event
            time.sleep(0.1)
    stop_worker(worker)
    assert n == args.events, (n, args.events)
    assert dead == args.refused, (dead, args.refused)
    log(f"    {units:,} exposed units of {distinct_units:,} distinct, {int(unit_events):,} events attributed")
    log("(a) the floor of a row per unit: COPY + a bare upsert of each batch's units, nothing else…")
    floor_s = unit_row_floor(database_url, unit_batches)
    log(f"    {args.events / floor_s:,.0f} events/s")
    steady_rate = (args.events - first_n) / (done_at - first_at) if done_at > first_at else float("nan")
    return {
        "events": args.events,
        "partitions": args.partitions,
        "sink_connections": Settings.from_env().sink_connections,
        "history_units": args.history,
        "refused_records": args.refused,
        "distinct_units": distinct_units,
        "exposed_units": units,
        "attributed_events": int(unit_events),
        "publish_events_per_s": round(publish_rate),
        "baseline_events_per_s": round(args.events / baseline_s),
        "worker_events_per_s": round(steady_rate),
        "worker_events_per_s_including_startup": round(args.events / (done_at - started)),
        "worker_startup_s": round(first_at - started, 2),
        "ratio_worker_to_baseline": round(steady_rate * baseline_s / args.events, 3),
        "unit_row_floor_events_per_s": round(args.events / floor_s),
        "ratio_unit_row_floor_to_baseline": round(baseline_s / floor_s, 3),
    }


FLOOR_BATCH = 10_000  # the worker's batch size (ABFLOW_BATCH_MAX_EVENTS' default)


def unit_row_floor(database_url: str, unit_batches: list[list[str]]) -> float:
    """Seconds to write a row per unit the way the worker's storage must at least: per batch, a COPY
    of its distinct units and one INSERT … ON CONFLICT DO UPDATE adding to their sums, committed.
    No validation, exposure, attribution, windows, dedup ids or offsets: the cost of keeping
    units in PostgreSQL alone, which no worker that keeps them there can beat."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("CREATE TABLE bench_unit_floor (LIKE unit_state INCLUDING ALL) WITH (fillfactor = 75)")
        conn.execute("CREATE TEMPORARY TABLE floor_batch (unit_id text, invocations float8) ON COMMIT DELETE ROWS")
        conn.commit()
        started = time.perf_counter()
        for units in unit_batches:
            with conn.cursor() as cur:
                with cur.copy("COPY floor_batch (unit_id, invocations) FROM STDIN") as copy:
                    for unit in units:
                        copy.write_row((unit, 1.0))
                cur.execute(
                    "INSERT INTO bench_unit_floor AS s (experiment_id, unit_id, variant, exposed_at, invocations) "
                    "SELECT 'bench', unit_id, 'Champion', 0, invocations FROM floor_batch "
                    "ON CONFLICT (experiment_id, unit_id) DO UPDATE SET invocations = s.invocations + excluded.invocations")
            conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE bench_unit_floor")
        conn.commit()
    return elapsed


def freshness(args, bootstrap, database_url, home, engine) -> dict:
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, bootstrap, database_url, home, tag, args.partitions)
    ensure_topics(bootstrap, topics, args.partitions)
    experiment_id = new_experiment(engine, tag)
    total = int(args.rate * args.seconds)
    payloads = make_payloads(experiment_id, total, 2, time.time(), args.seconds, args.users)
    worker = start_worker(env, home / f"worker-{tag}.log")
    log(f"(b) waiting for the worker, then publishing {total:,} events at {args.rate:,.0f}/s…")
    publish_times = np.zeros(total)
    visible_times = np.full(total, np.nan)
    with (psycopg.connect(libpq_url(database_url), autocommit=True) as conn,
          Publisher(bootstrap, topics, {"linger.ms": 1}) as publisher):
        # Warm up: one event through, so the group has joined before the clock starts.
        warm = make_payloads(experiment_id, 1, 3, time.time(), 0, args.users)
        publish(publisher, warm)
        while counted(conn, experiment_id) < 1:
            time.sleep(0.05)
        base = 1
        started = time.perf_counter()
        sent = 0
        seen = 0
        tick = 0.01
        next_poll = started
        while seen < total:
            now = time.perf_counter()
            due = min(total, int((now - started) * args.rate))
            while sent < due:
                kind, key, value = payloads[sent]
                publisher.produce(topics.invocations if kind == "invocation" else topics.conversions, value, key=key)
                publish_times[sent] = time.perf_counter()
                sent += 1
            publisher.poll(0)
            if now >= next_poll:
                n = counted(conn, experiment_id) - base
                stamp = time.perf_counter()
                if n > seen:
                    visible_times[seen:n] = stamp
                    seen = n
                next_poll = now + tick
            else:
                time.sleep(0.001)
            if now - started > args.seconds + 60:
                raise SystemExit("freshness run did not complete")
        publisher.flush()
    stop_worker(worker)
    delays = visible_times - publish_times
    return {
        "rate_events_per_s": args.rate,
        "events": total,
        "freshness_p50_s": round(float(np.percentile(delays, 50)), 3),
        "freshness_p95_s": round(float(np.percentile(delays, 95)), 3),
        "freshness_p99_s": round(float(np.percentile(delays, 99)), 3),
        "freshness_max_s": round(float(delays.max()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events for the throughput run")
    parser.add_argument("--rate", type=float, default=5_000, help="events/s for the freshness run")
    parser.add_argument("--seconds", type=float, default=30, help="length of the freshness run")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--users", type=int, default=250_000,
                        help="units the events come from (about 245,000 distinct in 1,000,000 events)")
    parser.add_argument("--history", type=int, default=0,
                        help="units (with assignments, and a fifth as many held outcomes) an earlier experiment "
                             "left in the database before the throughput run")
    parser.add_argument("--refused", type=int, default=0,
                        help="invocations PostgreSQL refuses, spread through the throughput run (the path that "
                             "splits a batch to find them)")
    parser.add_argument("--only", choices=["throughput", "freshness"])
    add_broker_option(parser)
    args = parser.parse_args()

    stack = Stack(broker=args.broker)
    results = {"machine": f"{os.cpu_count()} cores", "stack": stack.kind}
    try:
        if args.only in (None, "throughput"):
            results["throughput"] = throughput(args, stack.bootstrap, stack.database_url, stack.home, stack.engine)
        if args.only in (None, "freshness"):
            results["freshness"] = freshness(args, stack.bootstrap, stack.database_url, stack.home, stack.engine)
    finally:
        stack.close()
    save_results("pipeline", results)


if __name__ == "__main__":
    main()
