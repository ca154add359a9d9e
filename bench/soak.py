"""Soak: the whole system under steady traffic for a long while, watched the way an operator would.

    python bench/soak.py [--minutes 20] [--rate 1000] [--users 50000]

Starts a worker (with its metrics port) and `abflow serve` (API and refresher) on the embedded
broker and PostgreSQL (or ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL), registers a Thompson
bandit and a canary rollout, and routes users from a fixed population through the serving SDK
for ``--minutes``: returning users, conversions that arrive seconds later. Every 15 s it records
the worker's and the API's resident memory, the consumer lag and batch time from the worker's
metrics, how far the counted events trail the published ones, and PostgreSQL's size. At the end
it stops publishing and checks that every event was counted exactly once. Prints the figures,
the first minute against the last (growth is what a soak is for), and saves them.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Stack, save_results  # noqa: E402
from pipeline import run_env, stop_worker  # noqa: E402

from abflow.core.config import parse_config  # noqa: E402
from abflow.local.stack import free_port, wait_for_port  # noqa: E402
from abflow.settings import libpq_url  # noqa: E402
from producers.publisher import ensure_topics  # noqa: E402
from producers.sdk import ServingClient  # noqa: E402
from storage.registry import create_experiment  # noqa: E402

SAMPLE_EVERY_S = 15.0


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


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE))


def batch_p95(text: str) -> float | None:
    """The 95th percentile of the worker's batch time, from its cumulative histogram (upper bucket bound)."""
    buckets = sorted((float("inf") if le == "+Inf" else float(le), float(n)) for le, n in
                     re.findall(r'^abflow_worker_batch_seconds_bucket{le="([^"]+)"} ([0-9.e+-]+)$', text, re.MULTILINE))
    if not buckets or buckets[-1][1] == 0:
        return None
    return next(le for le, n in buckets if n >= 0.95 * buckets[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="invocations per second")
    parser.add_argument("--users", type=int, default=50_000, help="the population users are drawn from")
    args = parser.parse_args()

    stack = Stack(Path(tempfile.mkdtemp(prefix="abflow-soak-")))
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    worker_port, api_port = free_port(), free_port()
    env.update(ABFLOW_WORKER_METRICS_PORT=str(worker_port), ABFLOW_API_KEYS_ADMIN=f"soak-{tag}")
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
    logs = stack.home
    worker = subprocess.Popen([sys.executable, "-m", "abflow.cli", "worker"], env=env, cwd=ROOT,
                              stdout=open(logs / "worker.log", "ab"), stderr=subprocess.STDOUT)
    api = subprocess.Popen([sys.executable, "-m", "abflow.cli", "serve", "--port", str(api_port)], env=env, cwd=ROOT,
                           stdout=open(logs / "serve.log", "ab"), stderr=subprocess.STDOUT)
    samples = []
    published = 0
    rng = random.Random(7)
    rates = {"A": 0.04, "B": 0.05, "C": 0.045, "v1": 0.05, "v2": 0.05}
    pending: list[tuple[float, object]] = []  # conversions due later: (due, served)
    try:
        wait_for_port(api_port, 60, api, "the API")
        wait_for_port(worker_port, 60, worker, "the worker's metrics")
        with ServingClient(stack.bootstrap, topics) as client, \
                psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
            client.wait_ready(30)
            started = time.monotonic()
            next_sample = started
            log(f"soaking for {args.minutes:g} min at {args.rate:,.0f} invocations/s…")
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                due = int((now - started) * args.rate) - published
                for _ in range(max(0, due)):
                    experiment_id = bandit if rng.random() < 0.5 else canary
                    served = client.assign(experiment_id, f"user-{rng.randrange(args.users)}")
                    client.invocation(served, latency_ms=rng.uniform(5, 80), error=rng.random() < 0.01)
                    published += 1
                    if served.in_experiment and rng.random() < rates[served.variant]:
                        pending.append((now + rng.expovariate(1 / 5.0), served))
                while pending and pending[0][0] <= now:
                    client.conversion(pending.pop(0)[1])
                    published += 1
                pending.sort(key=lambda item: item[0])
                if now >= next_sample:
                    next_sample += SAMPLE_EVERY_S
                    text = scrape(worker_port)
                    counted = conn.execute("SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows "
                                           "WHERE experiment_id = ANY(%s)", ([bandit, canary],)).fetchone()[0]
                    size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
                    samples.append({"t": round(now - started), "worker_mb": round(rss_mb(worker.pid), 1),
                                    "api_mb": round(rss_mb(api.pid), 1), "lag": metric_sum(text, "abflow_worker_consumer_lag"),
                                    "batch_p95_s": batch_p95(text), "behind": published - int(counted),
                                    "postgres_mb": round(size / 2**20, 1)})
                    log(f"  {samples[-1]}")
                time.sleep(0.005)
            client.publisher.flush(60)
            for _, served in pending:  # conversions still due: send them now, so the totals can close
                client.conversion(served)
                published += 1
            client.publisher.flush(60)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                counted = int(conn.execute("SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows "
                                           "WHERE experiment_id = ANY(%s)", ([bandit, canary],)).fetchone()[0])
                if counted >= published:
                    break
                time.sleep(0.5)
            time.sleep(3)  # anything still in flight would show as a double count
            counted = int(conn.execute("SELECT coalesce(sum(invocations + conversions), 0) FROM variant_windows "
                                       "WHERE experiment_id = ANY(%s)", ([bandit, canary],)).fetchone()[0])
            rollout = conn.execute("SELECT state, stage FROM rollouts WHERE experiment_id = %s", (canary,)).fetchone()
    finally:
        stop_worker(api)
        stop_worker(worker)
        stack.close()
    first = [s for s in samples if s["t"] <= 60]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60]

    def mean(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return round(sum(values) / len(values), 3) if values else None

    results = {"minutes": args.minutes, "rate": args.rate, "users": args.users, "published": published,
               "counted": counted, "exact": counted == published, "rollout": list(rollout) if rollout else None,
               **{f"{key}_first_minute": mean(first, key) for key in ("worker_mb", "api_mb", "postgres_mb")},
               **{f"{key}_last_minute": mean(last, key) for key in ("worker_mb", "api_mb", "postgres_mb")},
               "lag_max": max(s["lag"] for s in samples), "behind_max": max(s["behind"] for s in samples),
               "behind_last_minute": mean(last, "behind"),
               "batch_p95_s_max": max((s["batch_p95_s"] for s in samples if s["batch_p95_s"]), default=None),
               "samples": samples}
    save_results("soak", results)
    if not results["exact"]:
        raise SystemExit(f"counted {counted:,} of {published:,} published events")


if __name__ == "__main__":
    main()
