"""Benchmarks of the bandit service.

    python bench/bandit.py [--only regret|sdk|api|freshness]

(a) freshness: at a steady --rate invocations/s, the delay from an invocation's
    publish to the first weights version whose statistics include it (p50/p95/p99);
(b) API assign from --concurrency concurrent clients, p50/p99, against GET /ping
    (no I/O) of the same server in the same run: once as fast as the clients go
    (saturated), once at a steady --api-rate requests/s (a Python httpx load
    generator); and, when `wrk` is installed, saturated with `wrk` (C, its own
    process) against `abflow serve --workers 1` and `--workers 2`;
(c) SDK assign per call, in-process (new users and returning users);
(d) regret of each policy against the oracle and against a uniform split, averaged
    over seeds, in seed 001's scenario (4.5 % vs 5.2 %) and a three-arm scenario.

(a)-(c) use ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL when set, else the embedded stack.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Stack, save_results  # noqa: E402
from pipeline import new_experiment, run_env, start_worker, stop_worker  # noqa: E402

from abflow.local.stack import free_port, wait_for_port  # noqa: E402
from abflow.settings import libpq_url  # noqa: E402
from bandit_service.policies import PolicyConfig  # noqa: E402
from bandit_service.simulation import simulate_regret  # noqa: E402
from producers.contracts import Invocation, encode  # noqa: E402
from producers.publisher import Publisher, ensure_topics  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentiles(values) -> dict:
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "p99": float(np.percentile(array, 99))}


# -- (d) regret ---------------------------------------------------------------------------

def regret(seeds: int, users: int) -> dict:
    scenarios = {"seed 001: 4.5 % vs 5.2 %": [0.045, 0.052], "three arms: 3 %, 5 %, 8 %": [0.03, 0.05, 0.08]}
    policies = {"uniform (WeightedSampling)": PolicyConfig("WeightedSampling"),
                "EpsilonGreedy (0.1)": PolicyConfig("EpsilonGreedy", epsilon=0.1, warmup=100),
                "UCB1": PolicyConfig("UCB1", warmup=100),
                "ThompsonSampling": PolicyConfig("ThompsonSampling", warmup=100)}
    table = {}
    for scenario, rates in scenarios.items():
        rows = {}
        for name, config in policies.items():
            values = [simulate_regret(PolicyConfig(**{**config.__dict__, "seed": s}), rates, users, seed=s)
                      for s in range(seeds)]
            rows[name] = float(np.mean(values))
        uniform = rows["uniform (WeightedSampling)"]
        table[scenario] = {name: {"regret_conversions": round(value, 1),
                                  "regret_vs_uniform": round(value / uniform, 3)} for name, value in rows.items()}
        log(f"(d) {scenario}: " + ", ".join(f"{k} {v:.0f}" for k, v in rows.items()))
    return {"users": users, "seeds": seeds, "refresh_every_users": 1000, "scenarios": table}


# -- (c) SDK ----------------------------------------------------------------------------------

def sdk(stack: Stack, calls: int) -> dict:
    from datetime import datetime, timezone

    from bandit_service.allocations import allocation_record
    from producers.sdk import ServingClient

    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    ensure_topics(stack.bootstrap, topics, 4)
    with Publisher(stack.bootstrap, topics) as publisher:
        publisher.produce(topics.allocations, allocation_record("sdk-bench", 1, "ThompsonSampling", "ThompsonSampling",
                                                                {"A": 0.2, "B": 0.3, "C": 0.5}, datetime.now(timezone.utc)),
                          key="sdk-bench")
    with ServingClient(stack.bootstrap, topics) as client:
        client.wait_ready(30)
        while True:
            try:
                client.weights("sdk-bench")
                break
            except LookupError:
                time.sleep(0.05)
        users = [f"user-{i}" for i in range(calls)]
        started = time.perf_counter()
        for user in users:
            client.assign("sdk-bench", user)
        new_us = (time.perf_counter() - started) / calls * 1e6
        started = time.perf_counter()
        for user in users:
            client.assign("sdk-bench", user)
        returning_us = (time.perf_counter() - started) / calls * 1e6
    log(f"(c) SDK assign: {new_us:.2f} µs (new user), {returning_us:.2f} µs (returning)")
    return {"calls": calls, "new_user_us": round(new_us, 2), "returning_user_us": round(returning_us, 2)}


# -- (b) API -----------------------------------------------------------------------------------

async def load(url: str, method: str, body_of, requests: int, concurrency: int, headers: dict,
               rate: float = 0.0) -> list[float]:
    """Latencies of ``requests`` requests from ``concurrency`` clients: as fast as they go (closed loop),
    or at ``rate`` requests/s in total (open loop: a request starts on schedule, not when the last ended)."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))
    begin = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=10) as client:
        async def one_client() -> None:
            for i in counter:
                if rate > 0:
                    delay = begin + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                started = time.perf_counter()
                response = await client.request(method, url, json=body_of(i))
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies


WRK_ASSIGN = """
key = "%s"
counter = 0
request = function()
   counter = counter + 1
   local unit = %s
   return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key},
                     string.format('{"unit_id": "%%s"}', unit))
end
"""


def wrk(url: str, connections: int, seconds: int, script: Path | None = None) -> dict:
    """p50/p99 (ms) and requests/s of `wrk` against ``url``; errors (non-2xx) counted."""
    import re
    import subprocess

    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 2)

    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50": ms("50%"), "p99": ms("99%"), "requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out)
                                                                                   .group(1))),
            "non_2xx": int(failed.group(1)) if failed else 0}


def api_with_wrk(stack: Stack, env: dict, experiment_id: str, token: str, concurrency: int) -> dict:
    import subprocess

    scripts = {"assign_new_user": stack.home / "wrk-new.lua", "assign_returning_user": stack.home / "wrk-returning.lua"}
    scripts["assign_new_user"].write_text(WRK_ASSIGN % (token, 'string.format("w-%d-%d", math.random(1, 1e9), counter)'))
    scripts["assign_returning_user"].write_text(WRK_ASSIGN % (token, 'string.format("r-%d", math.random(1, 1000))'))
    result = {}
    for workers in (1, 2):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "abflow.cli", "serve", "--port", str(port), "--no-refresher",
                                   "--workers", str(workers)], env=env, cwd=ROOT,
                                  stdout=open(stack.home / f"serve-wrk-{workers}.log", "ab"), stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 60, server, "the API")
            base = f"http://127.0.0.1:{port}"
            assign_url = f"{base}/experiments/{experiment_id}/assign"
            wrk(assign_url, concurrency, 3, scripts["assign_returning_user"])  # warm up, and store the returning units
            runs = {"ping": wrk(f"{base}/ping", concurrency, 10)}
            for name, script in scripts.items():
                runs[name] = wrk(assign_url, concurrency, 10, script)
            result[f"workers_{workers}"] = runs
            for name, figures in runs.items():
                log(f"(b) wrk, {workers} worker(s), {name}: p50 {figures['p50']} ms, p99 {figures['p99']} ms, "
                    f"{figures['requests_per_s']}/s")
        finally:
            server.terminate()
            server.wait(30)
    return result


def api(stack: Stack, requests: int, concurrency: int, rate: float) -> dict:
    import subprocess

    from abflow.core.config import parse_config
    from storage.registry import create_experiment

    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    env["ABFLOW_API_KEYS_ADMIN"] = "bench-admin-key"
    env["ABFLOW_API_KEYS_SERVING"] = token = "bench-serving-key"  # what a serving process holds
    experiment_id = f"api-bench-{tag}"
    create_experiment(stack.engine, parse_config({"experiment_id": experiment_id, "strategy": "ThompsonSampling",
                                                  "variants": [{"name": "A"}, {"name": "B"}]}))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "abflow.cli", "serve", "--port", str(port), "--no-refresher"],
                              env=env, cwd=ROOT, stdout=open(stack.home / "serve.log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 60, server, "the API")
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        asyncio.run(load(f"{base}/ping", "GET", lambda _: None, 500, concurrency, headers))  # warm up
        assign_url = f"{base}/experiments/{experiment_id}/assign"
        result = {"requests": requests, "concurrency": concurrency}
        for mode, pace in (("saturated", 0.0), (f"at_{rate:.0f}_per_s", rate)):
            ping = asyncio.run(load(f"{base}/ping", "GET", lambda _: None, requests, concurrency, headers, pace))
            new = asyncio.run(load(assign_url, "POST", lambda i, m=mode: {"unit_id": f"{m}-u{i}"}, requests,
                                   concurrency, headers, pace))
            returning = asyncio.run(load(assign_url, "POST", lambda i, m=mode: {"unit_id": f"{m}-u{i}"}, requests,
                                         concurrency, headers, pace))
            result[mode] = {}
            for name, values in (("ping", ping), ("assign_new_user", new), ("assign_returning_user", returning)):
                result[mode][name] = {k: round(v * 1000, 2) for k, v in percentiles(values).items()}  # ms
                log(f"(b) {mode} {name}: p50 {result[mode][name]['p50']} ms, p99 {result[mode][name]['p99']} ms")
    finally:
        server.terminate()
        server.wait(30)
    import shutil

    if shutil.which("wrk"):
        result["wrk_saturated"] = api_with_wrk(stack, env, experiment_id, token, concurrency)
    else:
        log("(b) wrk is not installed: the wrk runs are skipped")
    return result


# -- (a) freshness ---------------------------------------------------------------------------

def freshness(stack: Stack, rate: float, seconds: float) -> dict:
    import subprocess

    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    ensure_topics(stack.bootstrap, topics, 4)
    experiment_id = new_experiment(stack.engine, tag)  # WeightedSampling: switch to Thompson below
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        conn.execute("UPDATE experiments SET strategy = 'ThompsonSampling' WHERE experiment_id = %s", (experiment_id,))
    worker = start_worker(env, stack.home / f"worker-{tag}.log")
    refresher = subprocess.Popen([sys.executable, "-m", "abflow.cli", "refresher"], env=env, cwd=ROOT,
                                 stdout=open(stack.home / f"refresher-{tag}.log", "ab"), stderr=subprocess.STDOUT)
    total = int(rate * seconds)
    rng = random.Random(1)
    publish_times = np.zeros(total)
    visible = np.full(total, np.nan)
    query = ("SELECT (SELECT sum((v->>'invocations')::bigint) FROM jsonb_each(statistics->'variants') AS t(k, v)) "
             "FROM allocations WHERE experiment_id = %s ORDER BY version DESC LIMIT 1")
    try:
        with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn, \
                Publisher(stack.bootstrap, topics, {"linger.ms": 1}) as publisher:
            def used() -> int:
                row = conn.execute(query, (experiment_id,)).fetchone()
                return int(row[0] or 0) if row else 0

            # Warm up: one event through worker and refresher before the clock starts.
            warm = Invocation("warm", experiment_id, "Champion", "w", time.time())
            publisher.produce(topics.invocations, encode(warm), key="w")
            publisher.flush()
            while used() < 1:
                time.sleep(0.05)
            log(f"(a) publishing {total:,} invocations at {rate:,.0f}/s…")
            started = time.perf_counter()
            sent = seen = 0
            next_poll = started
            while seen < total:
                now = time.perf_counter()
                due = min(total, int((now - started) * rate))
                while sent < due:
                    event = Invocation(f"{tag}-{sent}", experiment_id, rng.choice(["Champion", "Challenger"]),
                                       f"user-{rng.randrange(100_000)}", time.time())
                    publisher.produce(topics.invocations, encode(event), key=event.user_id)
                    publish_times[sent] = time.perf_counter()
                    sent += 1
                publisher.poll(0)
                if now >= next_poll:
                    n = used() - 1
                    stamp = time.perf_counter()
                    if n > seen:
                        visible[seen:n] = stamp
                        seen = n
                    next_poll = now + 0.01
                else:
                    time.sleep(0.001)
                if now - started > seconds + 60:
                    raise SystemExit("freshness run did not complete; see the logs in " + str(stack.home))
    finally:
        stop_worker(worker)
        stop_worker(refresher)
    delays = visible - publish_times
    result = {"rate_invocations_per_s": rate, "invocations": total,
              **{f"{k}_s": round(v, 3) for k, v in percentiles(delays).items()}, "max_s": round(float(delays.max()), 3)}
    log(f"(a) publish -> weights: p50 {result['p50_s']} s, p95 {result['p95_s']} s, p99 {result['p99_s']} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["regret", "sdk", "api", "freshness"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--sdk-calls", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--api-rate", type=float, default=300, help="requests/s of the open-loop API run")
    parser.add_argument("--rate", type=float, default=5_000)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    results: dict = {"machine": f"{os.cpu_count()} cores"}
    if args.only in (None, "regret"):
        results["regret"] = regret(args.seeds, args.users)
    if args.only != "regret":
        stack = Stack()
        try:
            if args.only in (None, "sdk"):
                results["sdk_assign"] = sdk(stack, args.sdk_calls)
            if args.only in (None, "api"):
                results["api_assign"] = api(stack, args.requests, args.concurrency, args.api_rate)
            if args.only in (None, "freshness"):
                results["freshness_to_weights"] = freshness(stack, args.rate, args.seconds)
        finally:
            stack.close()
    save_results("bandit", results)


if __name__ == "__main__":
    main()
