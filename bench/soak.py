"""Soak: the whole system under steady traffic for a long while, watched the way an operator would.

    python bench/soak.py [--minutes 30] [--rate 5000] [--users 50000] [--api-rate 50]

Starts a worker (with its metrics port) and `abflow serve` (API and refresher) on the embedded
broker and PostgreSQL (or ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL), registers a Thompson
bandit and a canary rollout, and for ``--minutes`` routes users from a fixed population through
the serving SDK at ``--rate`` events/s (invocations and the conversions that follow some of them
seconds later: returning users, late outcomes, weights that move meanwhile) while other users go
through the HTTP API (assign, then an invocation) at ``--api-rate`` requests/s. Every minute it
records each process's resident memory and share of a core (worker, API, broker; PostgreSQL's
share too), the consumer lag and batch time from the worker's metrics, how far the counted events
trail the published ones, and the size of every table. At the end it stops publishing and checks
that every event was counted exactly once, and prints the growth from the 5th minute to the last
(growth is what a soak is for).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Stack, add_broker_option, cpu_seconds, metric_sum, save_results, scrape  # noqa: E402
from pipeline import run_env, stop_worker  # noqa: E402

from abflow.core.config import parse_config  # noqa: E402
from abflow.local.stack import EmbeddedPostgres, free_port, wait_for_port  # noqa: E402
from abflow.settings import libpq_url  # noqa: E402
from producers.publisher import Publisher, ensure_topics  # noqa: E402
from producers.sdk import ServingClient  # noqa: E402
from storage.registry import create_experiment  # noqa: E402

SAMPLE_EVERY_S = 60.0
STEADY_AFTER_S = 300.0  # growth is measured from the first sample after this
RATES = {"A": 0.04, "B": 0.05, "C": 0.045, "v1": 0.05, "v2": 0.05}  # true conversion rates
CONVERSION_SHARE = sum(RATES.values()) / len(RATES)  # about the conversions per invocation


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), in MB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            total += int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{p}/status").read()).group(1))
        except (OSError, AttributeError):
            pass
    return total / 1024


def batch_p95(text: str) -> float | None:
    """The 95th percentile of the worker's batch time, from its cumulative histogram (upper bucket bound)."""
    buckets = sorted((float("inf") if le == "+Inf" else float(le), float(n)) for le, n in
                     re.findall(r'^abflow_worker_batch_seconds_bucket{le="([^"]+)"} ([0-9.e+-]+)$', text, re.MULTILINE))
    if not buckets or buckets[-1][1] == 0:
        return None
    return next(le for le, n in buckets if n >= 0.95 * buckets[-1][1])


def table_sizes_mb(conn) -> dict[str, float]:
    """Every table of the schema with its indexes and TOAST, in MB."""
    return {name: round(size / 2**20, 2) for name, size in conn.execute(
        "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables "
        "WHERE schemaname NOT LIKE 'pg_temp%%' ORDER BY relname")}


class ApiTraffic(threading.Thread):
    """Users served through the HTTP API: assign, then an invocation, at ``rate`` requests/s."""

    def __init__(self, port: int, key: str, experiment_id: str, rate: float, users: int):
        super().__init__(name="soak-api", daemon=True)
        self.base, self.key, self.experiment_id = f"http://127.0.0.1:{port}", key, experiment_id
        self.rate, self.users = rate, users
        self.stop = threading.Event()
        self.accepted = 0  # invocations the API took (202): they must all be counted
        self.failures = 0
        self.latencies_ms: list[float] = []

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {self.key}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def run(self) -> None:
        rng = random.Random(11)
        started = time.monotonic()
        for n in itertools.count():
            if self.stop.is_set():
                return
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            unit = f"api-user-{rng.randrange(self.users)}"
            try:
                sent = time.perf_counter()
                served = self._post(f"/experiments/{self.experiment_id}/assign", {"unit_id": unit})
                self.latencies_ms.append((time.perf_counter() - sent) * 1000)
                if served["in_experiment"]:
                    self._post(f"/experiments/{self.experiment_id}/invocations",
                               {"variant": served["variant"], "user_id": unit, "latency_ms": 20.0})
                    self.accepted += 1
            except (OSError, ValueError, KeyError):
                self.failures += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second through the SDK "
                        "(invocations, and the conversions of some of them)")
    parser.add_argument("--users", type=int, default=50_000, help="the population users are drawn from")
    parser.add_argument("--api-rate", type=float, default=50.0, help="assign + invocation requests per second through the API")
    parser.add_argument("--linger-ms", type=float, default=250.0,
                        help="the producer's linger: fewer, larger batches (the embedded broker lists every "
                             "batch it holds on each fetch, so their number is what slows it)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stack's directory (the processes' logs, the database) and print where it is")
    add_broker_option(parser)
    args = parser.parse_args()

    stack = Stack("abflow-soak-", keep=args.keep, broker=args.broker)
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    worker_port, api_port, admin_key = free_port(), free_port(), f"soak-{tag}"
    env.update(ABFLOW_WORKER_METRICS_PORT=str(worker_port), ABFLOW_API_KEYS_ADMIN=admin_key)
    ensure_topics(stack.bootstrap, topics, 4)
    bandit, canary = f"soak-bandit-{tag}", f"soak-canary-{tag}"
    create_experiment(stack.engine, parse_config({"experiment_id": bandit, "strategy": "ThompsonSampling", "warmup": 200,
                                                  "variants": [{"name": "A"}, {"name": "B"}, {"name": "C"}]}))
    create_experiment(stack.engine, parse_config({
        "experiment_id": canary, "strategy": "WeightedSampling",
        "variants": [{"name": "v1", "role": "champion"}, {"name": "v2", "role": "challenger"}],
        "rollout": {"stages": [5, 10, 25, 50, 100], "min_duration_seconds": args.minutes * 60 / 6, "min_sample": 300,
                    "primary_margin": 0.5,
                    "max_duration_seconds": args.minutes * 60}}))
    broker_pid = next((part.process.pid for part in stack.parts if not isinstance(part, EmbeddedPostgres)), None)
    postgres_pid = next((part.process.pid for part in stack.parts if isinstance(part, EmbeddedPostgres)), None)
    logs = stack.home
    worker = subprocess.Popen([sys.executable, "-m", "abflow.cli", "worker"], env=env, cwd=ROOT,
                              stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)
    api = subprocess.Popen([sys.executable, "-m", "abflow.cli", "serve", "--port", str(api_port)], env=env, cwd=ROOT,
                           stdout=open(logs / "serve.log", "ab"), stderr=subprocess.STDOUT)
    samples = []
    published = 0
    rng = random.Random(7)
    invocation_rate = args.rate / (1 + CONVERSION_SHARE)
    pending: list[tuple[float, int, object]] = []  # a heap of conversions due later: (due, tie-break, served)
    experiments = [bandit, canary]

    def counted_events(conn) -> int:
        return int(conn.execute("SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows "
                                "WHERE experiment_id = ANY(%s)", (experiments,)).fetchone()[0])

    try:
        wait_for_port(api_port, 60, api, "the API")
        wait_for_port(worker_port, 60, worker, "the worker's metrics")
        traffic = ApiTraffic(api_port, admin_key, bandit, args.api_rate, args.users)
        publisher = Publisher(stack.bootstrap, topics, {"linger.ms": args.linger_ms})
        with ServingClient(stack.bootstrap, topics, publisher=publisher) as client, \
                psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
            client.wait_ready(30)
            started = time.monotonic()
            next_sample = started
            processes = {"worker": worker.pid, "api": api.pid, "broker": broker_pid, "postgres": postgres_pid}
            cpu_then, then = {name: cpu_seconds(pid) for name, pid in processes.items()}, started
            traffic.start()
            log(f"soaking for {args.minutes:g} min at {args.rate:,.0f} events/s through the SDK and "
                f"{args.api_rate:g} requests/s through the API…")
            invoked = outside = 0
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                for _ in range(max(0, int((now - started) * invocation_rate) - invoked)):
                    experiment_id = bandit if rng.random() < 0.5 else canary
                    served = client.assign(experiment_id, f"user-{rng.randrange(args.users)}")
                    client.invocation(served, latency_ms=rng.uniform(5, 80), error=rng.random() < 0.01)
                    invoked += 1
                    if not served.in_experiment:  # the SDK publishes nothing for it (a rollout that just ended)
                        outside += 1
                        continue
                    published += 1
                    if rng.random() < RATES[served.variant]:
                        heapq.heappush(pending, (now + rng.expovariate(1 / 5.0), published, served))
                while pending and pending[0][0] <= now:
                    client.conversion(heapq.heappop(pending)[2])
                    published += 1
                if now >= next_sample:
                    next_sample += SAMPLE_EVERY_S
                    # Each process's share of a core since the last sample: which one works harder as time goes on.
                    cpu_now = {name: cpu_seconds(pid) for name, pid in processes.items()}
                    cpu_percent = {name: round((cpu_now[name] - cpu_then[name]) / (now - then) * 100, 1)
                                   if None not in (cpu_now[name], cpu_then[name]) and now - then > 1 else None
                                   for name in processes}
                    cpu_then, then = cpu_now, now
                    text = scrape(worker_port)
                    tables = table_sizes_mb(conn)
                    samples.append({
                        "t": round(now - started), "worker_mb": round(rss_mb(worker.pid), 1),
                        "api_mb": round(rss_mb(api.pid), 1),
                        "broker_mb": round(rss_mb(broker_pid), 1) if broker_pid else None,
                        "lag": metric_sum(text, "abflow_worker_consumer_lag"), "batch_p95_s": batch_p95(text),
                        "behind": published + traffic.accepted - counted_events(conn),
                        "postgres_mb": round(sum(tables.values()), 1), "cpu_percent": cpu_percent, "tables_mb": tables})
                    log("  " + json.dumps({k: v for k, v in samples[-1].items() if k != "tables_mb"}))
                time.sleep(0.002)
            elapsed = time.monotonic() - started
            traffic.stop.set()
            traffic.join(15)
            for _, _, served in pending:  # conversions still due: send them now, so the totals can close
                client.conversion(served)
                published += 1
            client.publisher.flush(60)
            expected = published + traffic.accepted
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and counted_events(conn) < expected:
                time.sleep(0.5)
            time.sleep(3)  # anything still in flight would show as a double count
            counted = counted_events(conn)
            rollout = conn.execute("SELECT state, stage FROM rollouts WHERE experiment_id = %s", (canary,)).fetchone()
            final_tables = table_sizes_mb(conn)
    finally:
        stop_worker(api)
        stop_worker(worker)
        stack.close()

    steady = next((s for s in samples if s["t"] >= STEADY_AFTER_S), samples[0])
    last = samples[-1]

    def growth(key: str) -> float | None:
        if steady[key] is None or not steady[key]:
            return None
        return round((last[key] - steady[key]) / steady[key] * 100, 1)

    latencies = sorted(traffic.latencies_ms)
    results = {
        "broker": stack.kind,
        "minutes": args.minutes, "rate": args.rate, "api_rate": args.api_rate, "users": args.users,
        "events_per_s": round(published / elapsed), "api_requests": len(latencies), "api_failures": traffic.failures,
        "api_assign_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
        "published": expected, "served_outside_the_experiment": outside, "counted": counted, "exact": counted == expected,
        "rollout": list(rollout) if rollout else None,
        "steady_from_s": steady["t"],
        "growth_percent_from_steady": {key: growth(key) for key in ("worker_mb", "api_mb", "broker_mb")},
        "lag_steady": steady["lag"], "lag_last": last["lag"], "lag_max": max(s["lag"] for s in samples),
        "behind_max": max(s["behind"] for s in samples),
        "batch_p95_s_max": max((s["batch_p95_s"] for s in samples if s["batch_p95_s"]), default=None),
        "table_growth_mb_from_steady": {name: round(size - steady["tables_mb"].get(name, 0.0), 2)
                                        for name, size in final_tables.items()
                                        if abs(size - steady["tables_mb"].get(name, 0.0)) >= 0.01},
        "samples": samples,
    }
    save_results("soak", results)
    if not results["exact"]:
        raise SystemExit(f"counted {counted:,} of {expected:,} published events")


if __name__ == "__main__":
    main()
