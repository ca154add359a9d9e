"""How fast a failing canary is rolled back: from the first faulty event to the rollback weights.

Each run registers the canary example (5 % → … → 100 %, error-rate guardrail with a
2-point margin, rollback after 2 harmful checks), sends healthy traffic at the
current weights through the real stream worker and refresher, then makes the
challenger fail (20 % errors by default) and waits for the allocation with phase
"rollback". Runs alternate between the check intervals given (default: the
plan's default and 1 s), so each is measured against the other on the same
machine at the same time.

Two delays per run:
- fault → rollback: from the first faulty event to the rollback weights being stored
  and published;
- evidence → rollback: from the moment the events published so far were enough for
  the guardrail to find harm (replayed offline with the same pure judgement the
  controller uses) to the rollback. This is the pipeline's own part: aggregation,
  the check, and the second check that `rollback_after: 2` asks for.

    python bench/rollout.py [--runs 10] [--rate 1000] [--fault-errors 0.2] [--check-intervals 0.5,1]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
import psycopg
from common import ROOT, Stack, save_results
from pipeline import run_env, start_worker, stop_worker

from abflow.core.buckets import choose, hash_point
from abflow.core.config import load_config_text, parse_config
from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from abflow.settings import libpq_url
from bandit_service.report.evidence import UnitMoments
from bandit_service.rollouts.machine import guardrails
from producers.contracts import Invocation, encode
from producers.publisher import Publisher, ensure_topics
from storage.registry import create_experiment

WARMUP_SECONDS = 8.0  # healthy traffic at 5 % before the fault
BASE_ERROR_RATE = 0.01


def log(message: str) -> None:
    print(message, flush=True)


def canary_config(experiment_id: str, check_interval: float | None = None):
    text = resources.files("abflow.examples").joinpath("canary.yaml").read_text()
    raw = {**load_config_text(text, "canary.yaml").to_dict(), "experiment_id": experiment_id}
    if check_interval is not None:
        raw["rollout"] = {**raw["rollout"], "check_interval_seconds": check_interval}
    return parse_config(raw)


def evidence_time(config, events: list[tuple[float, str, str, bool, float]], fault_index: int) -> float | None:
    """When the events published so far first let the guardrails find harm (None: never): the stage's
    units, each with its invocations and errors, as the controller reads them from ``stage_units``."""
    champion, challenger = (v.name for v in config.variants)
    units: dict[str, dict[str, list[int]]] = {champion: {}, challenger: {}}  # variant -> unit -> [invocations, errors]
    hists = {name: [0] * LATENCY_BUCKETS for name in (champion, challenger)}
    for index, (at, user, variant, error, latency_ms) in enumerate(events):
        sums = units[variant].setdefault(user, [0, 0])
        sums[0] += 1
        sums[1] += error
        hists[variant][latency_bucket(latency_ms)] += 1
        if index >= fault_index and variant == challenger and error:
            moments = {}
            for name, per_unit in units.items():
                values = np.array(list(per_unit.values()), dtype=float).reshape(-1, 2)
                moments[name] = UnitMoments.of_units({"invocations": values[:, 0], "errors": values[:, 1]},
                                                     config.metrics)
            if any(row.get("harmful") for row in guardrails(config, moments, hists)):
                return at
    return None


def one_run(stack: Stack, topics, run: int, tag: str, rate: float, fault_errors: float, timeout: float,
            check_interval: float) -> dict:
    experiment_id = f"bench-rollout-{tag}-{run}"
    config = canary_config(experiment_id, check_interval)
    champion, challenger = (v.name for v in config.variants)
    create_experiment(stack.engine, config)
    rng = random.Random(run)
    events: list[tuple[float, str, str, bool, float]] = []
    weights, fault_at, fault_index, rolled_back = None, None, None, None
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn, \
            Publisher(stack.bootstrap, topics, {"linger.ms": 1}) as publisher:
        def latest():
            return conn.execute("SELECT phase, weights, extract(epoch FROM computed_at) FROM allocations "
                                "WHERE experiment_id = %s ORDER BY version DESC LIMIT 1", (experiment_id,)).fetchone()

        started = time.time()
        sent, next_poll, warm_from = 0, 0.0, None
        while rolled_back is None:
            now = time.time()
            if now >= next_poll:
                row = latest()
                next_poll = now + 0.02
                if row is not None:
                    phase, weights, computed_at = row
                    if warm_from is None:
                        warm_from = now
                    if phase == "rollback":
                        rolled_back = float(computed_at)
                        break
            if now - started > timeout:
                raise SystemExit(f"run {run}: no rollback within {timeout:.0f} s; see the logs in {stack.home}")
            if weights is None:
                time.sleep(0.01)
                continue
            if fault_at is None and now - warm_from >= WARMUP_SECONDS:
                fault_at, fault_index = now, len(events)
            due = int((now - warm_from) * rate)
            while sent < due:
                user = f"user-{rng.randrange(1_000_000)}"
                variant = choose(weights, hash_point(experiment_id, user))
                failing = fault_at is not None and variant == challenger
                error = rng.random() < (fault_errors if failing else BASE_ERROR_RATE)
                latency_ms = 40.0 * float(np.exp(rng.gauss(0, 0.5)))
                at = time.time()
                publisher.produce(topics.invocations, encode(Invocation(f"{experiment_id}-{sent}", experiment_id,
                                  variant, user, at, weights[variant], latency_ms, error)), key=user)
                events.append((at, user, variant, error, latency_ms))
                sent += 1
            publisher.poll(0)
            time.sleep(0.002)
    evidence_at = evidence_time(config, events, fault_index)
    result = {"fault_to_rollback_s": rolled_back - fault_at,
              "evidence_to_rollback_s": None if evidence_at is None else rolled_back - evidence_at,
              "fault_to_evidence_s": None if evidence_at is None else evidence_at - fault_at,
              "events": len(events)}
    log(f"run {run} (checks every {check_interval:g} s): fault → rollback {result['fault_to_rollback_s']:.2f} s "
        f"(evidence after {result['fault_to_evidence_s'] or float('nan'):.2f} s, "
        f"then {result['evidence_to_rollback_s'] or float('nan'):.2f} s to the rollback)")
    return result


def summary(values: list[float]) -> dict:
    array = np.array([v for v in values if v is not None])
    return {"p50_s": round(float(np.percentile(array, 50)), 3), "p95_s": round(float(np.percentile(array, 95)), 3),
            "max_s": round(float(array.max()), 3), "runs": int(array.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1000, help="invocations/s of the traffic")
    parser.add_argument("--fault-errors", type=float, default=0.2, help="the failing challenger's error rate")
    parser.add_argument("--timeout", type=float, default=120, help="seconds a run may take")
    default_interval = canary_config("x").rollout.check_interval_seconds
    parser.add_argument("--check-intervals", default=",".join(f"{v:g}" for v in sorted({default_interval, 1.0})),
                        help="comma-separated check intervals (s) to compare; runs alternate between them "
                        "(default: %(default)s)")
    args = parser.parse_args()
    intervals = [float(v) for v in args.check_intervals.split(",")]
    stack = Stack(Path(tempfile.mkdtemp(prefix="abflow-bench-")))
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    ensure_topics(stack.bootstrap, topics, 4)
    worker = start_worker(env, stack.home / f"worker-{tag}.log")
    refresher = subprocess.Popen([sys.executable, "-m", "abflow.cli", "refresher"], env=env, cwd=ROOT,
                                 stdout=open(stack.home / f"refresher-{tag}.log", "ab"), stderr=subprocess.STDOUT)
    runs: dict[float, list[dict]] = {interval: [] for interval in intervals}
    try:
        for run in range(args.runs * len(intervals)):
            interval = intervals[run % len(intervals)]
            runs[interval].append(one_run(stack, topics, run, tag, args.rate, args.fault_errors, args.timeout,
                                          interval))
    finally:
        stop_worker(worker)
        stop_worker(refresher)
        stack.close()
    save_results("rollout", {
        "machine": f"{os.cpu_count()} cores", "stack": stack.kind, "rate_invocations_per_s": args.rate,
        "fault_error_rate": args.fault_errors, "rollback_after": canary_config("x").rollout.rollback_after,
        "by_check_interval_s": {f"{interval:g}": {
            "fault_to_rollback": summary([r["fault_to_rollback_s"] for r in results]),
            "fault_to_evidence": summary([r["fault_to_evidence_s"] for r in results]),
            "evidence_to_rollback": summary([r["evidence_to_rollback_s"] for r in results]),
        } for interval, results in runs.items()},
    })


if __name__ == "__main__":
    main()
