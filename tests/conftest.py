"""Real components for the tests.

In order of preference: the Kafka and PostgreSQL named by
ABFLOW_KAFKA_BOOTSTRAP / ABFLOW_DATABASE_URL; containers (testcontainers) when
a Docker daemon answers; otherwise the embedded PostgreSQL that `abflow up` uses,
with the embedded broker or, with ``--broker kafka`` (or ABFLOW_TEST_BROKER=kafka),
Apache Kafka fetched from Maven Central and run as one KRaft node. Each test gets
its own topics, consumer group and experiment ids, so tests share one stack
without seeing each other's data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from abflow.local.stack import EmbeddedBroker, EmbeddedPostgres, die_with_parent

# One key per role for the API in every test (the settings and the `serve` processes get them).
API_KEYS = {"serving": "test-serving-key", "read": "test-read-key", "admin": "test-admin-key"}
ADMIN = {"Authorization": f"Bearer {API_KEYS['admin']}"}


@dataclass
class Stack:
    kafka_bootstrap: str
    database_url: str
    kind: str  # "external", "containers", "embedded" or "kafka" (Apache Kafka beside the embedded PostgreSQL)
    postgres: EmbeddedPostgres | None = None  # only when embedded: tests may stop and start it
    broker: object = None  # EmbeddedBroker or ApacheKafka
    _closers: list = field(default_factory=list)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def pytest_addoption(parser):
    parser.addoption("--broker", choices=("embedded", "kafka"), default=os.environ.get("ABFLOW_TEST_BROKER", "embedded"),
                     help="the local broker the tests run on when no external one is named: the embedded one "
                          "(default) or Apache Kafka (needs Java and Maven the first time)")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, request) -> Stack:
    bootstrap = os.environ.get("ABFLOW_KAFKA_BOOTSTRAP")
    database_url = os.environ.get("ABFLOW_DATABASE_URL")
    if bootstrap and database_url:
        stack = Stack(bootstrap, database_url, "external")
    elif _docker_answers():
        try:
            from testcontainers.community.kafka import KafkaContainer
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers before 4.14 kept its modules at the top level
            from testcontainers.kafka import KafkaContainer
            from testcontainers.postgres import PostgresContainer

        kafka = KafkaContainer().with_kraft()
        postgres = PostgresContainer("postgres:17", driver=None)
        kafka.start()
        postgres.start()
        stack = Stack(kafka.get_bootstrap_server(), postgres.get_connection_url(), "containers")
        stack._closers += [kafka.stop, postgres.stop]
    else:
        home = tmp_path_factory.mktemp("stack")
        if request.config.getoption("--broker") == "kafka":
            from abflow.local.kafka import ApacheKafka

            broker = ApacheKafka(home / "kafka-data", home / "broker.log").start()
        else:
            broker = EmbeddedBroker(home / "broker.log").start()
        postgres = EmbeddedPostgres(home / "pgdata", home / "postgres.log", durable=False).start()
        stack = Stack(broker.bootstrap, postgres.url, request.config.getoption("--broker"), postgres=postgres,
                      broker=broker)
        stack._closers += [broker.stop, postgres.stop]
    from storage.db import upgrade

    upgrade(stack.database_url)
    yield stack
    for close in reversed(stack._closers):
        close()


@pytest.fixture
def run_env(stack, tmp_path) -> dict[str, str]:
    """Environment for abflow processes of one test: its own topics, group and home."""
    tag = uuid.uuid4().hex[:8]
    return {
        **os.environ,
        "ABFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "ABFLOW_DATABASE_URL": stack.database_url,
        "ABFLOW_HOME": str(tmp_path / "home"),
        "ABFLOW_TOPIC_INVOCATIONS": f"t{tag}.invocations",
        "ABFLOW_TOPIC_CONVERSIONS": f"t{tag}.conversions",
        "ABFLOW_TOPIC_DEAD_LETTERS": f"t{tag}.dead-letters",
        "ABFLOW_TOPIC_ALLOCATIONS": f"t{tag}.allocations",
        "ABFLOW_TOPIC_SHADOWS": f"t{tag}.shadows",
        "ABFLOW_CONSUMER_GROUP": f"abflow-test-{tag}",
        "ABFLOW_KAFKA_SESSION_TIMEOUT_SECONDS": "3",
        "ABFLOW_PARTITIONS": "4",
        "ABFLOW_BATCH_MAX_SECONDS": "0.1",
        **{f"ABFLOW_API_KEYS_{role.upper()}": key for role, key in API_KEYS.items()},
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def settings(run_env, monkeypatch):
    from abflow.settings import Settings

    for key, value in run_env.items():
        if key.startswith("ABFLOW_"):
            monkeypatch.setenv(key, value)
    return Settings.from_env()


@pytest.fixture
def engine(stack):
    from storage.db import make_engine

    engine = make_engine(stack.database_url)
    yield engine
    engine.dispose()


class ServiceProcess:
    """An `abflow` service (`worker`, `refresher`) as a child process, to be stopped or killed like a real one."""

    def __init__(self, env: dict[str, str], log_path: Path, command: tuple[str, ...] = ("worker",)):
        self.env = env
        self.log_path = log_path
        self.command = command
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "abflow.cli", *self.command], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM),
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def services(run_env, tmp_path):
    """Start `abflow` services for one test; all are stopped at its end."""
    started: list[ServiceProcess] = []

    def start(*command: str, name: str | None = None) -> ServiceProcess:
        label = name or command[0]
        process = ServiceProcess(run_env, tmp_path / f"{label}-{len(started)}.log", command).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def workers(services):
    return lambda name="worker": services("worker", name=name)


def wait_until(predicate, timeout: float, interval: float = 0.2, message: str = "condition", workers=()):
    """Poll ``predicate`` until it is truthy; fail early with its log when a worker died, and show the
    workers' logs when time runs out (a worker that stalls says where in them)."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            assert worker.alive(), f"worker exited with {worker.process.returncode}:\n{worker.log()[-4000:]}"
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {worker.log_path.name}:\n{worker.log()[-4000:]}" for worker in workers)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}{logs}")
        time.sleep(interval)
