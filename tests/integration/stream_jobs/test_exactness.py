"""Exactness under failure: a worker killed with SIGKILL, a rebalance between workers, PostgreSQL restarted."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from producers.publisher import Publisher, ensure_topics
from stream_jobs.source import event_topics
from tests.conftest import wait_until
from tests.helpers import (
    Expected,
    assert_units_match,
    assert_windows_match,
    conversion,
    counted_events,
    invocation,
    make_experiment,
    now,
    publish,
    stream_counters,
)

ROOT = Path(__file__).resolve().parents[3]


def make_events(experiment_id: str, count: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    start = now() - 1200
    events = []
    for i in range(count):
        variant = rng.choice(["Champion", "Challenger"])
        ts = start + 1200 * i / count + rng.uniform(-30, 0)  # roughly in order, some late
        user = f"user-{rng.randrange(2000)}"
        if rng.random() < 0.85:
            events.append(("invocation", invocation(experiment_id, variant, ts, user,
                                                    latency_ms=round(rng.uniform(1, 300), 2), error=rng.random() < 0.02)))
        else:
            events.append(("conversion", conversion(experiment_id, variant, ts, user, reward=rng.choice([1.0, 2.0, 0.5]))))
    return events


class BackgroundPublisher(threading.Thread):
    """Publishes events at a steady rate from another thread, like a serving fleet."""

    def __init__(self, settings, events, rate: float):
        super().__init__(daemon=True)
        self.settings, self.events, self.rate = settings, events, rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Publisher(self.settings.kafka_bootstrap, self.settings.topics) as publisher:
                started = time.monotonic()
                for kind, event in self.events:
                    publish(publisher, kind, event)
                    self.sent += 1
                    ahead = self.sent / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "publisher did not finish"
        assert self.error is None, self.error


def expected_of(events) -> Expected:
    expected = Expected()
    for kind, event in events:
        expected.add(kind, event)
    return expected


# The experiments' metrics also count only the events within 300 s of exposure (of 1,200 s of
# events): the stream keeps those sums too, and they must be as exact as the rest.
METRIC_WINDOW = 300


def assert_exact_and_stable(engine, expected: Expected, workers_alive, timeout: float = 120) -> None:
    experiment_ids = {key[0] for key in expected.windows}
    wait_until(lambda: counted_events(engine, experiment_ids) >= expected.events, timeout,
               message=f"{expected.events} events", workers=workers_alive)
    time.sleep(2)  # anything still in flight would show up as a double count now
    assert counted_events(engine, experiment_ids) == expected.events
    assert_windows_match(engine, expected)
    assert_units_match(engine, expected, METRIC_WINDOW)


def published_beforehand(settings, engine, seed: int, count: int = 30_000) -> tuple[str, Expected]:
    """A new experiment and ``count`` of its events, all published before any worker starts."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine, metric_window=METRIC_WINDOW)
    events = make_events(experiment_id, count, seed=seed)
    with Publisher(settings.kafka_bootstrap, settings.topics) as publisher:
        for kind, event in events:
            publish(publisher, kind, event)
    return experiment_id, expected_of(events)


def test_worker_killed_mid_stream_twice_stays_exact(settings, engine, workers, run_env):
    # Kafka offsets committed rarely: each restart re-reads what was already applied,
    # so only the offsets stored with the aggregates stand between it and a double count.
    run_env["ABFLOW_KAFKA_COMMIT_INTERVAL_SECONDS"] = "600"
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine, metric_window=METRIC_WINDOW)
    events = make_events(experiment_id, 60_000, seed=11)
    expected = expected_of(events)

    worker = workers("first")
    publisher = BackgroundPublisher(settings, events[:40_000], rate=8_000)
    publisher.start()
    wait_until(lambda: counted_events(engine, [experiment_id]) > 8_000, 90, message="progress", workers=[worker])
    worker.kill()
    killed_at = counted_events(engine, [experiment_id])
    assert 0 < killed_at < expected.events

    second = workers("second")
    wait_until(lambda: counted_events(engine, [experiment_id]) > killed_at + 5_000, 90, message="progress after restart",
               workers=[second])
    second.kill()
    publisher.finish()
    assert "already applied" in second.log()

    # While no worker runs: the rest of the stream, and duplicates of events already counted.
    rng = random.Random(3)
    with Publisher(settings.kafka_bootstrap, settings.topics) as p:
        for kind, event in events[40_000:] + rng.sample(events[:30_000], 2_000):
            publish(p, kind, event)

    third = workers("third")
    assert_exact_and_stable(engine, expected, [third])
    assert "already applied" in third.log()
    topics = [settings.topics.invocations, settings.topics.conversions]
    assert stream_counters(engine, topics) == {"counted": expected.events, "duplicates": 2_000, "dead_letters": 0}


def test_two_workers_and_rebalances_stay_exact(settings, engine, workers):
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine, metric_window=METRIC_WINDOW)
    events = make_events(experiment_id, 80_000, seed=12)
    expected = expected_of(events)

    first = workers("first")
    publisher = BackgroundPublisher(settings, events, rate=5_000)
    publisher.start()
    wait_until(lambda: counted_events(engine, [experiment_id]) > 5_000, 90, message="progress", workers=[first])
    every = len(event_topics(settings)) * settings.partitions
    second = workers("second")  # joins: the partitions are split between the two
    wait_until(lambda: 0 < assigned_count(second) < every, 60, message="the partitions to be split", workers=[first, second])
    progress = counted_events(engine, [experiment_id])
    wait_until(lambda: counted_events(engine, [experiment_id]) > progress + 2_000, 60, message="progress while split",
               workers=[first, second])
    assert publisher.is_alive(), "the stream should still be flowing when the first worker leaves"
    assert first.stop() == 0  # leaves: its partitions move to the second worker mid-stream
    wait_until(lambda: assigned_count(second) == every, 60, message="the second worker to take every partition",
               workers=[second])
    publisher.finish()
    assert_exact_and_stable(engine, expected, [second])


def assigned_count(worker) -> int:
    """How many partitions the worker's latest assignment holds (0 before its first)."""
    lines = [line for line in worker.log().splitlines() if "assigned partitions: " in line]
    if not lines:
        return 0
    listed = lines[-1].split("assigned partitions: ", 1)[1].strip()
    return 0 if listed == "none" else len(listed.split(", "))


def test_postgres_restart_under_load_stays_exact(stack, settings, engine, workers):
    if stack.postgres is None:
        pytest.skip("needs the embedded PostgreSQL, which the test can stop and start")
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    experiment_id = make_experiment(engine, metric_window=METRIC_WINDOW)
    events = make_events(experiment_id, 40_000, seed=13)
    expected = expected_of(events)

    worker = workers()
    publisher = BackgroundPublisher(settings, events, rate=5_000)
    publisher.start()
    wait_until(lambda: counted_events(engine, [experiment_id]) > 5_000, 90, message="progress", workers=[worker])
    stack.postgres.stop()
    time.sleep(4)  # the worker keeps consuming and retrying its batch meanwhile
    assert worker.alive(), worker.log()[-3000:]
    stack.postgres.start()
    engine.dispose()  # the pool's connections died with the server
    publisher.finish()
    assert_exact_and_stable(engine, expected, [worker])
    assert "not applied" in worker.log()  # it did see the outage, and retried


# A worker whose sink fails once with an error that is not retried (a bug, not an outage): the second
# batch it applies raises.
FAILING_SINK = """
import runpy
import stream_jobs.sink as sink

original = sink.PostgresSink.apply
calls = []


def apply(self, batch):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("injected: a bug in the sink")
    return original(self, batch)


sink.PostgresSink.apply = apply
runpy.run_module("abflow.cli", run_name="__main__")
"""


def test_a_worker_whose_batch_fails_unexpectedly_exits_and_its_successor_counts_exactly(settings, engine, workers,
                                                                                         run_env, tmp_path):
    """An error no retry can fix must stop the worker (a supervisor restarts it, from the offsets
    stored with the aggregates), never drop the batch and go on with the next ones."""
    experiment_id, expected = published_beforehand(settings, engine, seed=17)

    log_path = tmp_path / "failing-worker.log"
    with open(log_path, "ab") as log:
        failing = subprocess.Popen([sys.executable, "-c", FAILING_SINK, "worker"], env=run_env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        code = failing.wait(90)
    except subprocess.TimeoutExpired:
        failing.kill()
        failing.wait(10)
        pytest.fail(f"the worker went on after its batch failed:\n{log_path.read_text()[-3000:]}")
    assert code != 0
    assert "injected: a bug in the sink" in log_path.read_text()
    assert counted_events(engine, [experiment_id]) < expected.events  # it stopped part way

    assert_exact_and_stable(engine, expected, [workers("successor")])


# A worker whose consumer answers as a broker that withheld records would: the first time a partition's
# reading reaches offset 1,000, its next 50 records are left out of the answer (the consumer's position
# has moved past them, as with a fetch answer that jumps ahead).
SKIPPING_CONSUMER = """
import runpy
import confluent_kafka
import stream_jobs.source as source

withheld = set()


class WithholdingConsumer(confluent_kafka.Consumer):
    def consume(self, *args, **kwargs):
        kept = []
        for m in super().consume(*args, **kwargs):
            if m.error() is None and 1000 <= m.offset() < 1050:
                key = (m.topic(), m.partition(), m.offset())
                if key not in withheld:
                    withheld.add(key)
                    continue
            kept.append(m)
        return kept


source.Consumer = WithholdingConsumer
runpy.run_module("abflow.cli", run_name="__main__")
"""


def test_records_a_broker_answer_jumped_over_are_read_again_and_counted(settings, engine, run_env, tmp_path):
    experiment_id, expected = published_beforehand(settings, engine, seed=23)  # ~6,400 invocations a partition

    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-c", SKIPPING_CONSUMER, "worker"], env=run_env, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        experiment_ids = {experiment_id}
        deadline = time.monotonic() + 120
        while counted_events(engine, experiment_ids) < expected.events and time.monotonic() < deadline:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # a double count would show now
        assert counted_events(engine, experiment_ids) == expected.events, log_path.read_text()[-3000:]
        assert_windows_match(engine, expected)
        assert_units_match(engine, expected, METRIC_WINDOW)
    finally:
        worker.terminate()
        worker.wait(30)
    text = log_path.read_text()
    # Every invocations partition had its hole, and each was read again and found.
    topic = settings.topics.invocations
    for partition in range(settings.partitions):
        assert f"{topic}[{partition}]: reading again found the records from offset 1000" in text, text[-3000:]
    assert "were passed without a record read" not in text
