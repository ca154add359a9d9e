"""Workers joining and leaving their consumer group, on whichever broker the tests run on."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import pytest

from producers.publisher import Publisher, ensure_topics
from stream_jobs.source import health
from tests.conftest import ServiceProcess, wait_until
from tests.helpers import counted_events, invocation, make_experiment, now, publish


def worker_in(run_env, tmp_path, name: str, **overrides) -> ServiceProcess:
    """A worker with a home (heartbeat) of its own, in the test's consumer group."""
    env = {**run_env, "ABFLOW_HOME": str(tmp_path / name), **overrides}
    return ServiceProcess(env, tmp_path / f"{name}.log").start()


def settings_of(settings, process: ServiceProcess):
    """The test's settings, with the home of ``process``: where its heartbeat is."""
    return dataclasses.replace(settings, home=Path(process.env["ABFLOW_HOME"]))


def test_a_worker_started_right_after_another_stopped_gets_the_partitions(stack, settings, engine, run_env, tmp_path):
    """Seen on the embedded broker: a worker started while its group still settled (another had been
    stopped with SIGTERM before it was assigned anything) held nothing for minutes, silently.

    On Apache Kafka the second worker gets the partitions and counts. On the embedded broker about
    one start in three is never assigned (its group coordinator does not complete the join; leaving
    and joining again, even after two session timeouts, did not help): there the worker must at
    least say so, in its log and its healthcheck, and the test reports the broker's defect."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine)
    first = worker_in(run_env, tmp_path, "first")
    time.sleep(1.0)  # started, not yet assigned
    first.process.send_signal(signal.SIGTERM)
    first.process.wait(30)
    second = worker_in(run_env, tmp_path, "second")
    try:
        with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
            for i in range(200):
                publish(publisher, "invocation", invocation(experiment_id, "Champion", now(), f"user-{i}"))

        def counted_or_stuck():
            if counted_events(engine, [experiment_id]) == 200:
                return "counted"
            problem = health(settings_of(settings, second))
            if stack.kind != "kafka" and problem and "no partition" in problem and "has held no partition" in second.log():
                return "stuck"
            return None

        outcome = wait_until(counted_or_stuck, 60, message="the 200 events", workers=[second])
        if outcome == "stuck":
            pytest.xfail("the embedded broker never assigned the second worker (a defect of its group "
                         "coordinator); the worker said so in its log and its healthcheck")
        assert health(settings_of(settings, second)) is None
    finally:
        second.stop()


def test_a_worker_that_holds_no_partition_for_long_says_so(settings, run_env, tmp_path):
    """One partition a topic, two workers: one holds them all, the other nothing. The idle one warns in
    its log and its healthcheck says why, after five session timeouts (at least 15 s)."""
    one_partition = {"ABFLOW_PARTITIONS": "1"}
    ensure_topics(settings.kafka_bootstrap, settings.topics, 1)
    workers = [worker_in(run_env, tmp_path, name, **one_partition) for name in ("a", "b")]
    try:
        def idle_one():
            states = [(w, health(settings_of(settings, w))) for w in workers]
            holding = [w for w, problem in states if problem is None]
            idle = [(w, problem) for w, problem in states if problem is not None and "no partition" in problem]
            return idle[0] if holding and idle else None

        idle, problem = wait_until(idle_one, 60, message="one worker holding everything, the other idle and "
                                                         "saying so", workers=workers)
        assert "more workers than partitions" in problem
        wait_until(lambda: "has held no partition" in idle.log(), 10, message="the warning in its log")
    finally:
        for w in workers:
            w.stop()
