"""How fast a failing canary is rolled back: from the first faulty event to the rollback weights.

Each run registers the canary example (5 % → … → 100 %, error-rate guardrail with a
2-point margin, rollback after 2 harmful checks), sends healthy traffic at the
current weights through the real stream worker and refresher, then makes the
challenger fail (20 % errors by default) and waits for the allocation with phase
"rollback". Runs alternate between the check intervals given (default: the
plan's default and 1 s), so each is measured against the other on the same
machine at the same time.

Three delays per run:
- fault → rollback: from the first faulty event to the rollback weights being stored
  and published;
- evidence → rollback: from the moment the events published so far were first enough for
  the guardrail to find harm (replayed offline with the same pure judgement the
  controller uses) to the rollback;
- sustained evidence → rollback: from the moment the published events were enough and
  stayed so until the rollback. This is the pipeline's own part: aggregation, the check,
  and the second check that `rollback_after: 2` asks for; a first crossing that more
  data undid is statistics, which the second check exists to wait out.

    python bench/rollout.py [--runs 10] [--rate 1000] [--fault-errors 0.2] [--check-intervals 0.5,1]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import uuid
from importlib import resources

import numpy as np
import psycopg
from common import ROOT, Stack, metric_sum, save_results, scrape
from pipeline import run_env, start_worker, stop_worker

from abflow.core.buckets import choose, hash_point
from abflow.core.config import load_config_text, parse_config
from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
from abflow.local.stack import free_port
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


def evidence_times(config, events: list[tuple[float, str, str, bool, float]], fault_index: int, until: float,
                   every: int = 10) -> tuple[float | None, float | None]:
    """When the events published so far let the guardrails find harm: first at all, and from when on
    without a break until ``until`` (the rollback). None: never. The stage's units, each with its
    invocations and errors, as the controller reads them from ``stage_units``; judged after every
    failing challenger request and every ``every``-th event from the fault on.

    The first crossing can be a passing one that more data undoes; a controller that asks for
    ``rollback_after`` harmful checks in a row rightly waits it out, so the pipeline's own delay is
    measured from the sustained one."""
    champion, challenger = (v.name for v in config.variants)
    units: dict[str, dict[str, list[int]]] = {champion: {}, challenger: {}}  # variant -> unit -> [invocations, errors]
    hists = {name: [0] * LATENCY_BUCKETS for name in (champion, challenger)}
    first = sustained = None
    for index, (at, user, variant, error, latency_ms) in enumerate(events):
        if at > until:
            break
        sums = units[variant].setdefault(user, [0, 0])
        sums[0] += 1
        sums[1] += error
        hists[variant][latency_bucket(latency_ms)] += 1
        if index < fault_index or not ((variant == challenger and error) or (index - fault_index) % every == 0):
            continue
        moments = {}
        for name, per_unit in units.items():
            values = np.array(list(per_unit.values()), dtype=float).reshape(-1, 2)
            moments[name] = UnitMoments.of_units({"invocations": values[:, 0], "errors": values[:, 1]},
                                                 config.metrics)
        if any(row.get("harmful") for row in guardrails(config, moments, hists)):
            first = at if first is None else first
            sustained = at if sustained is None else sustained
        else:
            sustained = None
    return first, sustained


def visibility_delays(published: list[float], seen: list[tuple[float, int]], first: int) -> list[float]:
    """For each event from index ``first`` on that was counted while ``seen`` was polled: seconds from
    its publication to the first poll that counted as many events as there were up to it."""
    delays, k = [], first
    for polled_at, count in seen:
        while k < min(count, len(published)):
            delays.append(polled_at - published[k])
            k += 1
    return delays


def batch_seconds_mean(metrics_port: int) -> float | None:
    """The worker's mean time to apply a batch so far, from its Prometheus histogram."""
    text = scrape(metrics_port)
    count = metric_sum(text, "abflow_worker_batch_seconds_count")
    return metric_sum(text, "abflow_worker_batch_seconds_sum") / count if count else None


def one_run(stack: Stack, run: int, rate: float, fault_errors: float, timeout: float, check_interval: float) -> dict:
    """One canary on topics of its own, with a worker and a refresher of its own: the embedded broker keeps
    every record in memory and its fetches slow down as a partition's log grows (measured: on one log
    shared by 32 runs the worker saw events 0.16 s after publication at first, 2.8 s after 16 minutes),
    so runs on one log would measure the broker's age, not the pipeline."""
    tag = uuid.uuid4().hex[:6]
    env, topics = run_env(os.environ, stack.bootstrap, stack.database_url, stack.home, tag, 4)
    metrics_port = free_port()
    env["ABFLOW_WORKER_METRICS_PORT"] = str(metrics_port)
    ensure_topics(stack.bootstrap, topics, 4)
    worker = start_worker(env, stack.home / f"worker-{tag}.log")
    refresher = subprocess.Popen([sys.executable, "-m", "abflow.cli", "refresher"], env=env, cwd=ROOT,
                                 stdout=open(stack.home / f"refresher-{tag}.log", "ab"), stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    try:
        result = canary_run(stack, topics, f"bench-rollout-{tag}", run, rate, fault_errors, timeout, check_interval)
        result["batch_apply_mean_s"] = batch_seconds_mean(metrics_port)
    finally:
        stop_worker(worker)
        stop_worker(refresher)
    log(f"run {run} (checks every {check_interval:g} s): fault → rollback {result['fault_to_rollback_s']:.2f} s "
        f"(evidence after {_s(result['fault_to_evidence_s'])}, then {_s(result['evidence_to_rollback_s'])} to the "
        f"rollback, {_s(result['sustained_evidence_to_rollback_s'])} from the sustained evidence); events visible to "
        f"the controller after p50 {_s(result['visible_p50_s'])}, p95 {_s(result['visible_p95_s'])}; "
        f"batches applied in {_s(result['batch_apply_mean_s'])} on average")
    return result


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def canary_run(stack: Stack, topics, experiment_id: str, run: int, rate: float, fault_errors: float, timeout: float,
               check_interval: float) -> dict:
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

        def counted() -> int:  # the invocations the controller can see (it judges stage_units)
            return int(conn.execute("SELECT coalesce(sum(invocations), 0) FROM stage_units WHERE experiment_id = %s",
                                    (experiment_id,)).fetchone()[0])

        started = time.time()
        sent, next_poll, warm_from = 0, 0.0, None
        seen: list[tuple[float, int]] = []  # (time, invocations counted)
        while rolled_back is None:
            now = time.time()
            if now >= next_poll:
                row = latest()
                if fault_at is not None:
                    seen.append((now, counted()))
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
    first, sustained = evidence_times(config, events, fault_index, rolled_back)
    visible = visibility_delays([at for at, *_ in events], seen, fault_index)
    result = {"visible_p50_s": float(np.percentile(visible, 50)) if visible else None,
              "visible_p95_s": float(np.percentile(visible, 95)) if visible else None,
              "fault_to_rollback_s": rolled_back - fault_at,
              "fault_to_evidence_s": None if first is None else first - fault_at,
              "evidence_to_rollback_s": None if first is None else rolled_back - first,
              "sustained_evidence_to_rollback_s": None if sustained is None else rolled_back - sustained,
              "events": len(events)}
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
    stack = Stack()
    runs: dict[float, list[dict]] = {interval: [] for interval in intervals}
    try:
        for run in range(args.runs * len(intervals)):
            interval = intervals[run % len(intervals)]
            runs[interval].append(one_run(stack, run, args.rate, args.fault_errors, args.timeout, interval))
    finally:
        stack.close()
    save_results("rollout", {
        "machine": f"{os.cpu_count()} cores", "stack": stack.kind, "rate_invocations_per_s": args.rate,
        "fault_error_rate": args.fault_errors, "rollback_after": canary_config("x").rollout.rollback_after,
        "by_check_interval_s": {f"{interval:g}": {
            "fault_to_rollback": summary([r["fault_to_rollback_s"] for r in results]),
            "fault_to_evidence": summary([r["fault_to_evidence_s"] for r in results]),
            "evidence_to_rollback": summary([r["evidence_to_rollback_s"] for r in results]),
            "sustained_evidence_to_rollback": summary([r["sustained_evidence_to_rollback_s"] for r in results]),
            "event_visible_to_controller_p95": summary([r["visible_p95_s"] for r in results]),
            "batch_apply_mean": summary([r["batch_apply_mean_s"] for r in results]),
        } for interval, results in runs.items()},
    })


if __name__ == "__main__":
    main()
